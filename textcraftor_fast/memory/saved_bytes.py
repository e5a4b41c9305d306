"""Exact byte counts for memory tests, benchmarks and the memory policy: bytes saved for backward (the exact,
deterministic metric of activation memory) and the bytes an optimizer's state holds.

Peak RSS on CPU is noisy and allocator-dependent; what a graph keeps alive for backward is what
checkpointing changes, and `saved_tensors_hooks` sees every tensor autograd packs. Each storage is
counted once (views of one tensor share it).
"""
from __future__ import annotations

from typing import Any, Callable, Iterable

import torch


def saved_tensor_bytes(fn: Callable[[], Any], ignore: Iterable[torch.Tensor] = ()) -> tuple[int, Any]:
    """Run fn() and return (bytes saved for backward by the graph it built, fn's result).

    Storages of `ignore` are not counted: pass a model's parameters to count only what the graph adds (a
    layer saves its weight for the input gradient, but the weight is resident anyway)."""
    skip = {t.untyped_storage().data_ptr() for t in ignore}
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        if storage.data_ptr() not in skip:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out


def optimizer_state_bytes(optimizer: torch.optim.Optimizer) -> int:
    """Bytes of tensor state the optimizer holds (moments, 8-bit code books and block scales; allocated at the
    first step)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values()
               for v in state.values() if torch.is_tensor(v))
