"""One forward+backward of the SD1.5 64x64-latent self-attention (B=2, H=8, N=4096, D=40, bf16): the Triton
flash attention vs F.scaled_dot_product_attention (torch picks its backend). CUDA only.

  pytest benchmarks/test_bench_attention.py --benchmark-only
The full table (every SD shape, each SDPA backend, memory) is benchmarks/gpu_attention.py.
"""
import pytest
import torch
import torch.nn.functional as F

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


@pytest.mark.parametrize("impl", ["ours", "sdpa"])
def test_attention_fwd_bwd_sd15_self64(benchmark, impl):
    from textcraftor_fast.kernels.attention import flash_attention

    fn = flash_attention if impl == "ours" else F.scaled_dot_product_attention
    g = torch.Generator(device="cuda").manual_seed(0)
    # (B, N, H, D) projections seen as (B, H, N, D), as diffusers' AttnProcessor2_0 passes them.
    q, k, v = (torch.randn(2, 4096, 8, 40, device="cuda", dtype=torch.bfloat16, generator=g).transpose(1, 2)
               .requires_grad_(True) for _ in range(3))
    dout = torch.randn(2, 8, 4096, 40, device="cuda", dtype=torch.bfloat16, generator=g)

    def step():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(dout)
        torch.cuda.synchronize()

    step()  # compile / pick the backend outside the timing
    benchmark(step)
    assert q.grad is not None and k.grad is not None and v.grad is not None
