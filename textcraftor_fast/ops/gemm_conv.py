"""Convolutions on small maps as one GEMM, on the CPU.

oneDNN (torch's CPU convolution) reorders a convolution's whole weight into its blocked layout in a fresh buffer on
every call. Where the output map is tiny the arithmetic is tiny too, and that reorder is most of the call: SD1.5's
UNet at a 16x16 latent runs its deep blocks on 8x8, 4x4 and 2x2 maps, with weights of 15-113 MiB. There
the convolution is an unfold of the input (small: a few pixels) and one matrix product with the weight as stored,
read once, and no weight-sized buffer is allocated (the timings and the step's lower peak: docs/performance.md).
Autograd goes through unfold and the product as usual, so input and weight gradients are torch's own.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

MIN_WEIGHT_BYTES = 1 << 20
"""Weights below this reorder in microseconds: those convolutions (and the tiny world's) stay on oneDNN."""


def _output_size(x: Tensor, kernel: tuple[int, int], stride: tuple[int, int],
                 padding: tuple[int, int]) -> tuple[int, int]:
    return tuple((x.shape[2 + i] + 2 * padding[i] - kernel[i]) // stride[i] + 1 for i in range(2))


def conv2d_gemm(x: Tensor, weight: Tensor, bias: Tensor | None, stride: tuple[int, int],
                padding: tuple[int, int]) -> Tensor:
    """F.conv2d(x, weight, bias, stride, padding) (groups 1, dilation 1) as unfold + one GEMM over the batch."""
    n = x.shape[0]
    out_c, _, kh, kw = weight.shape
    h_out, w_out = _output_size(x, (kh, kw), stride, padding)
    if (kh, kw) == (1, 1) and stride == (1, 1) and padding == (0, 0):
        cols = x.flatten(2)  # (n, c, h*w)
    else:
        cols = F.unfold(x, (kh, kw), padding=padding, stride=stride)  # (n, c*kh*kw, h_out*w_out)
    k, pixels = cols.shape[1], cols.shape[2]
    cols = cols.transpose(0, 1).reshape(k, n * pixels)  # every image's columns side by side: the weight read once
    flat = weight.reshape(out_c, k)
    y = torch.mm(flat, cols) if bias is None else torch.addmm(bias.unsqueeze(1), flat, cols)  # (out_c, n*pixels)
    return y.view(out_c, n, h_out, w_out).transpose(0, 1).contiguous()


class GemmConv2d(nn.Conv2d):
    """nn.Conv2d that runs as `conv2d_gemm` on the CPU when its output map has at most `gemm_max_pixels` pixels.

    Made by changing an nn.Conv2d's class in place (`swap_small_map_convs`): same parameters, same state_dict keys.
    """

    gemm_max_pixels: int = 64

    def forward(self, x: Tensor) -> Tensor:
        # A channels_last weight (ops.channels_last) would be copied whole by the GEMM's reshape: oneDNN then.
        if x.device.type == "cpu" and x.dim() == 4 and self.weight.is_contiguous():
            h_out, w_out = _output_size(x, self.kernel_size, self.stride, self.padding)
            if h_out * w_out <= self.gemm_max_pixels:
                return conv2d_gemm(x, self.weight, self.bias, self.stride, self.padding)
        return super().forward(x)


def _qualifies(module: nn.Module) -> bool:
    return (type(module) is nn.Conv2d and module.groups == 1 and module.dilation == (1, 1)
            and module.padding_mode == "zeros" and not isinstance(module.padding, str)
            and module.weight.numel() * module.weight.element_size() >= MIN_WEIGHT_BYTES)


def swap_small_map_convs(model: nn.Module, max_pixels: int) -> int:
    """Every plain nn.Conv2d of `model` with a weight of at least MIN_WEIGHT_BYTES (groups 1, dilation 1, zero
    padding) becomes a GemmConv2d for output maps of at most `max_pixels` pixels; returns how many."""
    count = 0
    for module in list(model.modules()):
        if _qualifies(module):
            module.__class__ = GemmConv2d
            module.gemm_max_pixels = max_pixels
            count += 1
    return count
