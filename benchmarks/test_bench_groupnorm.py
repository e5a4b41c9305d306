"""GroupNorm+SiLU forward+backward at one SD1.5 UNet shape: our Triton kernel vs torch eager. Needs CUDA.

  pytest benchmarks/test_bench_groupnorm.py --benchmark-only     # timings (group "groupnorm")
  python -m benchmarks.gpu_groupnorm                             # the full table: all shapes, fwd / bwd / both
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]

SHAPE, GROUPS = (2, 320, 64, 64), 32  # SD1.5 UNet first down block at 512x512, batch 2


def _ours(x, w, b):
    from textcraftor_fast.kernels.groupnorm import group_norm
    return group_norm(x, GROUPS, w, b, 1e-5, silu=True)


def _torch(x, w, b):
    return F.silu(F.group_norm(x, GROUPS, w, b, 1e-5))


@pytest.mark.benchmark(group="groupnorm")
@pytest.mark.parametrize("impl", [_ours, _torch], ids=["triton", "torch"])
def test_groupnorm_silu_fwd_bwd(benchmark, impl):
    gen = torch.Generator(device="cuda").manual_seed(0)
    x = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16, generator=gen).requires_grad_(True)
    dy = torch.randn(SHAPE, device="cuda", dtype=torch.bfloat16, generator=gen)
    w = torch.ones(SHAPE[1], device="cuda", dtype=torch.bfloat16)  # frozen, as in TextCraftor's UNet
    b = torch.zeros(SHAPE[1], device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = None
        impl(x, w, b).backward(dy)
        torch.cuda.synchronize()

    step()  # compile / warm up outside the timing
    benchmark.pedantic(step, rounds=50, iterations=1, warmup_rounds=5)
    assert x.grad is not None and x.grad.shape == x.shape and torch.isfinite(x.grad).all()
