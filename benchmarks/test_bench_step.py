"""One TextCraftor training step: ours vs the official recipe (baseline_official.py), on tiny random SD-architecture
models with two small random CLIP reward towers (CLIP score and HPSv2), so the towers' official waste is measured.

Both trainers run in one process on the same models, rewards and prompts, interleaved, so the ratio is meaningful
on a noisy 2-core box. Time is reported, never gated; bytes saved for backward and the official step's weight
gradients (which saved bytes cannot see) are deterministic and asserted.

  pytest benchmarks/test_bench_step.py --benchmark-only -s       # timings
  pytest benchmarks/test_bench_step.py --benchmark-disable       # CI: one step each, checks memory and gradients
"""
import os
import statistics
import time

import pytest
import torch

from baseline_official import official_trainer, weight_grads
from random_towers import write_random_clip
from textcraftor_fast import load_config
from textcraftor_fast.training.trainer import Trainer
from textcraftor_fast.memory.saved_bytes import saved_tensor_bytes

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

CONFIG = "configs/tiny_random.toml"
OVERRIDES = ["sampler.num_steps=10", "sampler.grad_steps=5", "train.batch_size=2", "train.progress_bar=false",
             "data.max_prompts=16", "output.overwrite=true"]
PROMPTS = ["a red circle", "a blue square"]


def _rewards(folder) -> str:
    clip, hps = write_random_clip(folder / "clip", seed=0), write_random_clip(folder / "hps", seed=1)
    return f'rewards=[{{name="clip_score", weight=0.05, path="{clip}"}}, {{name="hpsv2", weight=5.0, path="{hps}"}}]'


def _saved_bytes(trainer: Trainer) -> int:
    """Bytes the step's graph keeps for backward (forward only: recomputation during backward is transient)."""
    nbytes, (loss, _) = saved_tensor_bytes(lambda: trainer.forward(PROMPTS, 5))
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return nbytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    common = OVERRIDES + [_rewards(tmp_path_factory.mktemp("towers"))]
    ours = Trainer(load_config(CONFIG, common + [f'output.dir="{tmp_path_factory.mktemp("ours")}"']))
    official = official_trainer(CONFIG, common + [f'output.dir="{tmp_path_factory.mktemp("official")}"'])
    return ours, official


def test_step_memory_vs_official(pair, benchmark):
    ours, official = pair
    b_ours, b_official = _saved_bytes(ours), _saved_bytes(official)
    grads = weight_grads(official)
    held = {name: stats[2] for name, stats in grads.items() if stats[0]}
    benchmark.extra_info.update(saved_bytes_ours=b_ours, saved_bytes_official=b_official,
                                saved_ratio=b_official / b_ours, official_weight_grad_bytes=held)
    print(f"\nsaved for backward: ours {b_ours / 2**20:.2f} MiB, official {b_official / 2**20:.2f} MiB "
          f"(x{b_official / b_ours:.2f}); official .grad held: " +
          ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in held.items()))
    assert b_ours < b_official  # checkpointed VAE decode, frozen towers keep less for backward
    assert set(held) == {"unet", "clip_score", "hpsv2"}  # weight gradients of the UNet and both towers, not the VAE
    assert all(stats == (0, 0, 0) for stats in weight_grads(ours).values())
    benchmark.pedantic(ours.train_step, rounds=1, iterations=1)


def _clear_frozen_grads(trainer: Trainer) -> None:
    modules = [trainer.unet, trainer.vae, *trainer.rewards.rewards]
    for p in (p for m in modules for p in m.parameters()):
        p.grad = None


def test_step_time_vs_official(pair, benchmark):
    """Timed steps (--benchmark-only), after one untimed step of each trainer whose structure is asserted in every
    mode: why ours is faster, as deterministic facts of the step itself (never a time)."""
    ours, official = pair
    saved, grads = {}, {}
    for name, trainer in (("ours", ours), ("official", official)):
        _clear_frozen_grads(trainer)  # what is held after this step, this step computed
        saved[name], _ = saved_tensor_bytes(trainer.train_step)
        grads[name] = weight_grads(trainer)
    # Ours: no frozen module computes weight gradients. The official step computes every UNet weight's and the
    # towers' image-side ones (HPSv2's text side too), all non-zero; its VAE is frozen as ours. And it keeps more
    # for backward (plain VAE decode and towers).
    assert all(stats == (0, 0, 0) for stats in grads["ours"].values()), grads["ours"]
    unet_params = sum(1 for _ in official.unet.parameters())
    assert grads["official"]["unet"][:2] == (unet_params, unet_params) and grads["official"]["vae"] == (0, 0, 0)
    assert all(grads["official"][tower][0] == grads["official"][tower][1] > 0 for tower in ("clip_score", "hpsv2"))
    assert saved["ours"] < saved["official"], saved
    benchmark.extra_info.update(saved_bytes_step=saved)
    if benchmark.enabled:
        _time_interleaved(ours, official, benchmark, rounds=7)
    benchmark.pedantic(ours.train_step, rounds=1, iterations=1)


def _time_interleaved(ours: Trainer, official: Trainer, benchmark, rounds: int) -> None:
    times = {"ours": [], "official": []}
    for _ in range(rounds):  # interleaved so both see the same machine load
        for name, trainer in (("ours", ours), ("official", official)):
            t0 = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    spread = {k: (min(v), max(v)) for k, v in times.items()}
    benchmark.extra_info.update(median_s_ours=med["ours"], median_s_official=med["official"],
                                speedup=med["official"] / med["ours"], times_s=times)
    lo_hi = {k: f"[{v[0]:.3f}, {v[1]:.3f}]" for k, v in spread.items()}
    print(f"\nstep time median of {rounds}: ours {med['ours']:.3f}s {lo_hi['ours']}, official "
          f"{med['official']:.3f}s {lo_hi['official']}, speed-up x{med['official'] / med['ours']:.2f}")
