"""Lean vs fast plans alternated in one process: per-phase times."""
import sys, time, collections, dataclasses, torch
sys.path.insert(0, "/work/main/benchmarks")
from pathlib import Path
from sd15_step import ARM_OVERRIDES, sd15_overrides, _warm_up
from textcraftor_fast import load_config, sampler as S, engine as E
from textcraftor_fast.engine import Trainer
from textcraftor_fast.layer_checkpointing import checkpoint_each_layer
T = collections.defaultdict(float)
def timed(name, fn):
    def w(*a, **k):
        t0 = time.perf_counter(); r = fn(*a, **k); T[name] += time.perf_counter() - t0; return r
    return w
orig_step = S.guided_ddim_step
def gstep(*a, **k):
    name = "unet_grad" if torch.is_grad_enabled() else "unet_nograd"
    t0 = time.perf_counter(); r = orig_step(*a, **k); T[name] += time.perf_counter() - t0; return r
S.guided_ddim_step = gstep
E.decode_latents = timed("decode", E.decode_latents)
m = Path("/work/runs/sd15m")
ov = [*sd15_overrides(m / "sd15.safetensors", m / "vit_l14", 16, 25, 5, 1), *ARM_OVERRIDES["lean"],
      f'output.dir="/work/runs/s8/alt"']
tr = Trainer(load_config(None, ov))
tr.rewards.forward = timed("rewards", tr.rewards.forward)
tr.forward = timed("forward_total", tr.forward)
lean_plan = tr.memory_plan
fast_plan = dataclasses.replace(lean_plan, plain_unet_calls=5, vae=False)
def mode(name):
    if name == "lean":
        object.__setattr__(tr.cfg.sampler, "checkpoint", "step"); tr.memory_plan = lean_plan
        checkpoint_each_layer(*tr.tower_modules, enabled=True)
    else:
        object.__setattr__(tr.cfg.sampler, "checkpoint", "auto"); tr.memory_plan = fast_plan
        checkpoint_each_layer(*tr.tower_modules, enabled=False)
for name in ("lean", "fast"):
    mode(name); _warm_up(tr)
for r in range(int(sys.argv[1]) if len(sys.argv) > 1 else 2):
    for name in (("lean", "fast") if r % 2 == 0 else ("fast", "lean")):
        mode(name); T.clear()
        t0 = time.perf_counter(); tr.train_step(); tot = time.perf_counter() - t0
        fwd = T["forward_total"]
        print(f"round {r} {name}: total {tot:.1f} fwd {fwd:.1f} (nograd {T['unet_nograd']:.1f} grad {T['unet_grad']:.1f} "
              f"decode {T['decode']:.1f} rewards {T['rewards']:.1f}) backward+opt {tot - fwd:.1f}", flush=True)
