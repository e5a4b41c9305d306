"""Giving freed host memory back to the OS. glibc keeps the heap pages of freed tensors mapped (and, past its
dynamic mmap threshold, serves tensors of up to 32 MiB from the heap), so on CPU a step's freed activations stay in
the process's RSS and add to the next peak. `malloc_trim(0)` returns every free page; where the C library has no
malloc_trim (musl, macOS) the calls are no-ops."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def trim_host_heap() -> None:
    """Return the C heap's free pages to the OS (milliseconds; the pages fault back in when next used)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_freed_host_memory() -> None:
    """Collect garbage (cycles may hold tensors), then trim the heap."""
    gc.collect()
    trim_host_heap()
