"""One TextCraftor training step: ours vs the official code's recipe, on tiny random SD-architecture models.

The official train_textcraftor.py leaves requires_grad=True on the frozen UNet (its weight gradients are
computed and thrown away) and does not checkpoint the VAE decode. Both variants run here on the same
machine in one process, interleaved, so the ratio is meaningful on a noisy 2-core box. Time is reported
(never gated); bytes saved for backward are deterministic and asserted.

  pytest benchmarks/test_bench_step.py --benchmark-only          # timings
  pytest benchmarks/test_bench_step.py --benchmark-disable       # CI: runs once, checks memory
"""
import os
import statistics
import time

import pytest
import torch

from textcraftor_fast import load_config
from textcraftor_fast.engine import Trainer
from textcraftor_fast.memory import saved_tensor_bytes

torch.set_num_threads(int(os.environ.get("OMP_NUM_THREADS", "2")))

OVERRIDES = ["sampler.num_steps=10", "sampler.grad_steps=5", "train.batch_size=2", "train.progress_bar=false",
             "data.max_prompts=16"]


def _trainer(tmp_path, official: bool) -> Trainer:
    cfg = load_config("configs/tiny_random.toml", OVERRIDES + [f'output.dir="{tmp_path}"',
                                                               f"sampler.checkpoint_vae={'false' if official else 'true'}"])
    trainer = Trainer(cfg)
    if official:
        trainer.unet.requires_grad_(True)  # the official code's waste: UNet weight grads computed, then discarded
    return trainer


def _saved_bytes(trainer: Trainer) -> int:
    """Bytes the step's graph keeps for backward (forward only: recomputation during backward is transient)."""
    nbytes, (loss, _) = saved_tensor_bytes(lambda: trainer.forward(["a red circle", "a blue square"], 5))
    loss.backward()
    trainer.optimizer.zero_grad(set_to_none=True)
    return nbytes


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    return _trainer(tmp_path_factory.mktemp("ours"), False), _trainer(tmp_path_factory.mktemp("official"), True)


def test_step_memory_vs_official(pair, benchmark):
    ours, official = pair
    b_ours, b_official = _saved_bytes(ours), _saved_bytes(official)
    benchmark.extra_info.update(saved_bytes_ours=b_ours, saved_bytes_official=b_official,
                                saved_ratio=b_official / b_ours)
    assert b_ours < b_official  # checkpointed VAE decode keeps less for backward
    benchmark.pedantic(ours.train_step, rounds=1, iterations=1)


def test_step_time_vs_official(pair, benchmark):
    ours, official = pair
    times = {"ours": [], "official": []}
    rounds = 1 if benchmark.disabled else 5
    for _ in range(rounds):  # interleaved so both see the same machine load
        for name, trainer in (("ours", ours), ("official", official)):
            t0 = time.perf_counter()
            trainer.train_step()
            times[name].append(time.perf_counter() - t0)
    med = {k: statistics.median(v) for k, v in times.items()}
    benchmark.extra_info.update(median_s_ours=med["ours"], median_s_official=med["official"],
                                speedup=med["official"] / med["ours"])
    print(f"\nstep time median: ours {med['ours']:.3f}s, official-style {med['official']:.3f}s, "
          f"speed-up x{med['official'] / med['ours']:.2f}")
    benchmark.pedantic(ours.train_step, rounds=rounds, iterations=1)
