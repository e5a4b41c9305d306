"""Bytes saved for backward by one TextCraftor step vs K, per checkpoint policy (tiny random SD models).

Deterministic (counts what autograd packs), so it is asserted as well as reported:
  pytest benchmarks/test_bench_memory.py --benchmark-only -s
"""
import pytest

from textcraftor_fast import load_config
from textcraftor_fast.engine import Trainer
from textcraftor_fast.memory import saved_tensor_bytes

KS = (1, 2, 4, 8)


@pytest.fixture(scope="module")
def trainers(tmp_path_factory):
    out = {}
    for policy in ("none", "every_n", "step"):
        cfg = load_config("configs/tiny_random.toml", [
            "sampler.num_steps=8", "sampler.grad_steps=8", f"sampler.checkpoint={policy}", "train.batch_size=2",
            "train.progress_bar=false", "data.max_prompts=8", f'output.dir="{tmp_path_factory.mktemp(policy)}"'])
        out[policy] = Trainer(cfg)
    return out


def _bytes(trainer: Trainer, k: int) -> int:
    nbytes, (loss, _) = saved_tensor_bytes(lambda: trainer.forward(["a red circle", "a blue square"], k))
    del loss
    return nbytes


def test_saved_bytes_vs_k(trainers, benchmark):
    table = {policy: {k: _bytes(t, k) for k in KS} for policy, t in trainers.items()}
    benchmark.extra_info["saved_bytes"] = {p: {str(k): v for k, v in row.items()} for p, row in table.items()}
    print("\nbytes saved for backward (MB) by K:", "  ".join(f"K={k}" for k in KS))
    for policy, row in table.items():
        print(f"  {policy:8s}", "  ".join(f"{row[k] / 2**20:6.2f}" for k in KS))
    t = trainers["step"]
    latent_bytes = 2 * t.latent_channels * t.latent_size ** 2 * 4  # (B=2, 4, h, w) fp32
    # Flat in K: a checkpointed step keeps nothing but its input latent for the recompute.
    assert (table["step"][8] - table["step"][1]) / 7 <= latent_bytes
    assert table["none"][8] > 3 * table["none"][1]  # grows with K
    assert table["step"][8] < table["every_n"][8] < table["none"][8]
    benchmark.pedantic(_bytes, args=(trainers["step"], 5), rounds=1, iterations=1)
