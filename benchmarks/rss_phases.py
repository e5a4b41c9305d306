"""Exact peak RSS by phase of a lean SD1.5 step on CPU (docs/performance.md, Memory policy): at each phase change
(forward: encoder, UNet calls, decode, tower; backward: its start, the decoder, each UNet call's recompute, the
optimizer steps) VmHWM is read and reset through /proc/self/clear_refs, so each phase's peak is exact. Linux only.

  OMP_NUM_THREADS=2 python benchmarks/rss_phases.py --models DIR [extra overrides ...]

DIR holds the random SD1.5 file and ViT-L/14 tower of rss_probe.py / sd15_step.py (written there if missing).
Hooks wrap the engine's internals (diagnostic, not API): one warm-up, then STEPS (env, default 1) traced steps. A
UNet call is marked by its first down block's first resnet: in backward, with checkpoint_unet_blocks, that block
is recomputed last, so each "unet-recompute" phase then spans the end of one call and the next one's up blocks.
"""
import os
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from sd15_step import ARM_OVERRIDES, sd15_overrides, _warm_up
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
import textcraftor_fast.training.steppers as BS
from random_towers import write_sd15_in_child
if len(sys.argv) < 3 or sys.argv[1] != "--models":
    raise SystemExit(__doc__)
m = Path(sys.argv[2])
if not (m / "sd15.safetensors").exists() or not (m / "vit_l14").exists():
    write_sd15_in_child(m / "sd15.safetensors", m / "vit_l14")
ov = [*sd15_overrides(m / "sd15.safetensors", m / "vit_l14", 16, 25, 5, 1), *ARM_OVERRIDES["lean"], *sys.argv[3:],
      f'output.dir="{m / "phases_run"}"']
tr = Trainer(load_config(None, ov))
segs = []
in_bwd = lambda: torch._C._current_graph_task_id() != -1
def _status():
    d = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS"):
            d[k] = int(v.split()[0]) / 2**20
    return d
def label(l):
    l = ("B:" if in_bwd() else "F:") + l
    if segs and segs[-1][0] == l:
        return
    st = _status()
    if segs: segs[-1][1] = st["VmHWM"]
    open("/proc/self/clear_refs", "w").write("5")
    segs.append([l, 0.0, st["VmRSS"]])
calls = [0]
def unet_hook(mod, args):
    if in_bwd():
        calls[0] += 1; label(f"unet-recompute{calls[0]}")
    else:
        label("unet")
tr.unet.down_blocks[0].resnets[0].register_forward_pre_hook(unet_hook)
for mod in tr.vae.decoder.modules():
    if "Resnet" in mod.__class__.__name__:
        mod.register_forward_pre_hook(lambda m_, a: label("vae"))
clip = tr.rewards.rewards[0].tower.model
for layer in clip.vision_model.encoder.layers:
    layer.register_forward_pre_hook(lambda m_, a: label("tower"))
from textcraftor_fast.memory.layers import transformer_layers
for layer in transformer_layers(tr.text_encoder):
    layer.register_forward_pre_hook(lambda m_, a: label("encoder"))
_orig_step = BS.StepInBackward._step
BS.StepInBackward._step = lambda self, p: (label("optimizer-steps"), _orig_step(self, p))[1]
hooks = tr.optimizer_step.hooks  # optim.step_in_backward's StepInBackward
for h in hooks._handles:  # re-registered so that the labelled _step runs
    h.remove()
hooks._handles = [p.register_post_accumulate_grad_hook(hooks._step) for p in tr.params]
_orig_bwd = torch.autograd.backward
def bwd(*a, **k):
    st = _status()
    if segs: segs[-1][1] = st["VmHWM"]
    segs.append(["B:start", 0.0, st["VmRSS"]]); open("/proc/self/clear_refs", "w").write("5")
    return _orig_bwd(*a, **k)
torch.autograd.backward = bwd
_warm_up(tr)
for s in range(int(os.environ.get("STEPS", "1"))):
    segs.clear(); calls[0] = 0; label("step-start")
    t0 = time.perf_counter(); tr.train_step(); label("end")
    print(f"step {s}: {time.perf_counter() - t0:.1f} s; segments (label, peak, rss at start):", flush=True)
    for l, peak, rss in segs:
        print(f"  {l:24s} peak {peak:.3f}  start {rss:.3f}")
