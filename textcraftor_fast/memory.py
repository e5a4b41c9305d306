"""Bytes saved for backward: the exact, deterministic memory metric for tests and benchmarks.

Peak RSS on CPU is noisy and allocator-dependent; what a graph keeps alive for backward is what
checkpointing changes, and `saved_tensors_hooks` sees every tensor autograd packs. Each storage is
counted once (views of one tensor share it).
"""
from __future__ import annotations

from typing import Any, Callable

import torch


def saved_tensor_bytes(fn: Callable[[], Any]) -> tuple[int, Any]:
    """Run fn() and return (bytes saved for backward by the graph it built, fn's result)."""
    seen: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        storage = t.untyped_storage()
        seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = fn()
    return sum(seen.values()), out
