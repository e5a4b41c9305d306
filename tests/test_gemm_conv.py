"""Small-map convolutions as one GEMM (textcraftor_fast/ops/gemm_conv.py) against torch's own F.conv2d."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from textcraftor_fast.ops.gemm_conv import MIN_WEIGHT_BYTES, GemmConv2d, conv2d_gemm, swap_small_map_convs
from textcraftor_fast.ops.backend import apply_ops


@pytest.mark.parametrize("n,cin,cout,hw,k,stride,pad,bias", [
    (2, 96, 80, 2, 3, 1, 1, True),   # a deep 3x3 on a 2x2 map (CFG batch 2)
    (3, 64, 48, 4, 3, 2, 1, True),   # a downsampler: stride 2, 4x4 -> 2x2, odd batch
    (2, 128, 64, 2, 1, 1, 0, True),  # a 1x1 shortcut
    (1, 32, 16, 5, 3, 1, 0, False),  # no padding, no bias, a non-square count of pixels
])
def test_forward_and_both_gradients_are_conv2d_s(n, cin, cout, hw, k, stride, pad, bias):
    torch.manual_seed(0)
    x = torch.randn(n, cin, hw, hw, dtype=torch.float64, requires_grad=True)
    w = torch.randn(cout, cin, k, k, dtype=torch.float64, requires_grad=True)
    b = torch.randn(cout, dtype=torch.float64, requires_grad=True) if bias else None
    want = F.conv2d(x, w, b, (stride, stride), (pad, pad))
    got = conv2d_gemm(x, w, b, (stride, stride), (pad, pad))
    assert got.shape == want.shape and got.is_contiguous()
    torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12)
    g = torch.randn_like(want)
    inputs = [x, w] + ([b] if bias else [])
    for mine, ref in zip(torch.autograd.grad(got, inputs, g), torch.autograd.grad(want, inputs, g)):
        torch.testing.assert_close(mine, ref, rtol=1e-12, atol=1e-12)


def test_the_module_takes_the_gemm_only_on_small_maps(monkeypatch):
    torch.manual_seed(0)
    conv = nn.Conv2d(320, 320, 3, padding=1)  # 3.5 MiB of weight
    ref = nn.Conv2d(320, 320, 3, padding=1)
    ref.load_state_dict(conv.state_dict())
    assert swap_small_map_convs(conv, max_pixels=16) == 1 and type(conv) is GemmConv2d
    calls = []
    monkeypatch.setattr("textcraftor_fast.ops.gemm_conv.conv2d_gemm",
                        lambda *a: calls.append(a[0].shape) or conv2d_gemm(*a))
    with torch.no_grad():
        for hw in (2, 4, 5):
            x = torch.randn(2, 320, hw, hw)
            torch.testing.assert_close(conv(x), ref(x), rtol=1e-4, atol=1e-4)
    assert calls == [torch.Size([2, 320, 2, 2]), torch.Size([2, 320, 4, 4])]  # 5x5 = 25 pixels: oneDNN
    conv.to(memory_format=torch.channels_last)  # ops.channels_last: reshaping the weight would copy it whole
    with torch.no_grad():
        torch.testing.assert_close(conv(x[..., :2, :2]), ref(x[..., :2, :2]), rtol=1e-4, atol=1e-4)
    assert len(calls) == 2


def test_swap_keeps_small_weights_groups_and_state_dict():
    model = nn.Sequential(nn.Conv2d(4, 8, 3), nn.Conv2d(256, 256, 3, groups=2), nn.Conv2d(256, 256, 3))
    assert model[0].weight.nbytes < MIN_WEIGHT_BYTES <= min(model[1].weight.nbytes, model[2].weight.nbytes)
    keys, ptrs = set(model.state_dict()), [p.data_ptr() for p in model.parameters()]
    assert swap_small_map_convs(model, 16) == 1
    assert [type(m) for m in model] == [nn.Conv2d, nn.Conv2d, GemmConv2d]
    assert set(model.state_dict()) == keys and [p.data_ptr() for p in model.parameters()] == ptrs


def test_apply_ops_swaps_on_cpu_unless_torch_is_asked_for():
    def count(backend, device, pixels=16):
        return apply_ops({"m": nn.Sequential(nn.Conv2d(256, 256, 3))}, backend, device, "sdpa",
                         pixels)["small-map GEMM conv"]

    assert count("auto", "cpu") == 1
    assert count("torch", "cpu") == 0  # the official baseline's stock ops
    assert count("auto", "cpu", pixels=0) == 0
    assert count("torch", "cuda") == 0
