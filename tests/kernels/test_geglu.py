"""Fused GEGLU vs diffusers' GEGLU module: output and every gradient (input, proj.weight, proj.bias)."""
import pytest
import torch
from diffusers.models.activations import GEGLU

from tests.kernels.tolerance import assert_close_to_ref
from textcraftor_fast.kernels.geglu import TritonGEGLU, geglu, geglu_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _grads(module: torch.nn.Module, x: torch.Tensor, dout: torch.Tensor) -> dict[str, torch.Tensor]:
    x = x.detach().clone().requires_grad_(True)
    out = module(x)
    out.backward(dout)
    return {"out": out.detach(), "dx": x.grad, "dweight": module.proj.weight.grad, "dbias": module.proj.bias.grad}


def _check(dtype: torch.dtype, lead: tuple[int, ...], dim_in: int, dim_out: int, atol: float) -> None:
    g = torch.Generator().manual_seed(0)
    ref32 = GEGLU(dim_in, dim_out).double()
    with torch.no_grad():
        for p in ref32.parameters():
            p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float64) * 0.5)
    x = torch.randn(*lead, dim_in, generator=g, dtype=torch.float64)
    dout = torch.randn(*lead, dim_out, generator=g, dtype=torch.float64)
    torch_same = GEGLU(dim_in, dim_out).to(DEVICE, dtype)
    torch_same.load_state_dict(ref32.state_dict())
    ours = TritonGEGLU(dim_in, dim_out).to(DEVICE, dtype)
    ours.load_state_dict(ref32.state_dict())  # same keys as diffusers' module: proj.weight, proj.bias
    expected = _grads(ref32, x, dout)
    same = _grads(torch_same, x.to(DEVICE, dtype), dout.to(DEVICE, dtype))
    got = _grads(ours, x.to(DEVICE, dtype), dout.to(DEVICE, dtype))
    for name in expected:
        assert_close_to_ref(f"{dtype} {name}", got[name].cpu(), expected[name], same[name].cpu(), atol=atol)


@pytest.mark.parametrize("dtype,atol", [(torch.float32, 1e-4), (torch.float16, 1e-3), (torch.bfloat16, 1e-2)])
def test_geglu_matches_diffusers(dtype, atol):
    # F = 40 is not a power of two: the last block is masked. Two leading dims as in (B, tokens, C).
    _check(dtype, (2, 3), dim_in=8, dim_out=40, atol=atol)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("tokens,dim", [(4096, 320), (1024, 640), (256, 1280), (64, 1280)])
def test_geglu_sd_shapes_bf16(tokens, dim):
    _check(torch.bfloat16, (2, tokens), dim_in=dim, dim_out=4 * dim, atol=1e-2)


def test_geglu_saves_only_the_projection():
    h = torch.randn(3, 5, 2 * 24, device=DEVICE, requires_grad=True)
    saved: list[int] = []

    def pack(t):
        saved.append(t.numel() * t.element_size())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        geglu(h)
    assert saved == [h.numel() * 4]  # h alone; eager saves a, g and gelu(g) (1.5x h)
    eager: list[int] = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: eager.append(t.numel() * t.element_size()) or t,
                                                  lambda t: t):
        geglu_ref(h)
    assert sum(eager) == h.numel() * 4 * 3 // 2


def test_geglu_rejects_odd_last_dim():
    with pytest.raises(ValueError, match="last dim must be even"):
        geglu(torch.randn(2, 7, device=DEVICE))


def test_geglu_state_dict_keys_match_diffusers():
    assert set(TritonGEGLU(8, 16).state_dict()) == set(GEGLU(8, 16).state_dict())
    src = GEGLU(8, 16)
    wrapped = TritonGEGLU.from_diffusers(src)
    assert wrapped.proj is src.proj
