"""Kernel-vs-reference tolerances shared by the kernel tests.

fp32: an absolute bound. Lower precisions: flash-attention's rule -- the kernel may be at most twice as far
from the fp32 reference as torch in the same dtype is, plus a small atol:
``max|k - ref32| <= 2 * max|torch_same_dtype - ref32| + atol``.
"""
from __future__ import annotations

import torch
from torch import Tensor


def assert_close_to_ref(name: str, ours: Tensor, ref32: Tensor, torch_same_dtype: Tensor | None = None,
                        atol: float = 1e-4) -> None:
    """Fail with the worst element's error unless ``ours`` is within the dtype's bound of the fp32 reference.

    ``torch_same_dtype`` is the plain-torch result computed in ``ours.dtype``; required unless ours is fp32.
    Raises on empty tensors and on any NaN/inf so a test can never pass by comparing nothing.
    """
    assert ours.shape == ref32.shape, f"{name}: shape {tuple(ours.shape)} != reference {tuple(ref32.shape)}"
    assert ours.numel() > 0, f"{name}: compared an empty tensor"
    assert torch.isfinite(ours).all(), f"{name}: kernel output has NaN/inf"
    err = (ours.float() - ref32.float()).abs().max().item()
    if ours.dtype == torch.float32:
        bound = atol
    else:
        assert torch_same_dtype is not None, f"{name}: a {ours.dtype} check needs torch's result in that dtype"
        bound = 2 * (torch_same_dtype.float() - ref32.float()).abs().max().item() + atol
    assert err <= bound, f"{name}: max |ours - ref32| = {err:.3e} > bound {bound:.3e} ({ours.dtype})"
