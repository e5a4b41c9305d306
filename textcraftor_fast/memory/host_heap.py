"""Giving freed host memory back to the OS. glibc keeps the heap pages of freed tensors mapped (and, past its
dynamic mmap threshold, serves tensors of up to 32 MiB from the heap), so on CPU a step's freed activations stay in
the process's RSS and add to the next peak. `malloc_trim(0)` returns every free page; where the C library has no
malloc_trim (musl, macOS) the calls are no-ops.

A trim is not free: the pages it returns fault back in, zeroed, when next used. The engine trims only on the CPU and
only where the models are of SD size (`trims_pay_off`): there the host's RAM is the constraint and a trim costs
little next to a step, while on small models the faults cost more than the memory is worth (docs/performance.md
has both measurements). `attach_host_heap_trims` places the trims, by hooks, at the boundaries of a step."""
from __future__ import annotations

import ctypes
import ctypes.util
import functools
import gc
from collections.abc import Callable

import torch
from torch import nn

TRIM_MIN_MODEL_BYTES = 1 << 30
"""Parameter bytes of the models from which the engine trims the host heap (SD1.5's UNet alone: 3.2 GiB in fp32)."""


@functools.cache
def _malloc_trim() -> Callable[[int], int] | None:
    libc_name = ctypes.util.find_library("c")
    return getattr(ctypes.CDLL(libc_name), "malloc_trim", None) if libc_name else None


def trims_pay_off(device: torch.device, *models: nn.Module) -> bool:
    """Whether the engine should trim the host heap: on the CPU, with models of at least TRIM_MIN_MODEL_BYTES."""
    size = sum(p.numel() * p.element_size() for m in models for p in m.parameters())
    return device.type == "cpu" and size >= TRIM_MIN_MODEL_BYTES


def trim_host_heap() -> None:
    """Return the C heap's free pages to the OS (milliseconds; the pages fault back in when next used)."""
    trim = _malloc_trim()
    if trim is not None:
        trim(0)


def release_freed_host_memory() -> None:
    """Collect garbage (cycles may hold tensors), then trim the heap."""
    gc.collect()
    trim_host_heap()


def _trim_on_grad(output: object) -> None:
    """Trim when backward reaches `output` (a tensor, or a diffusers/transformers output whose first field is
    the tensor: a UNet's `sample`, an encoder's `last_hidden_state`)."""
    tensor = output if isinstance(output, torch.Tensor) else output[0] if isinstance(output, (tuple, dict)) else None
    if isinstance(tensor, torch.Tensor) and tensor.requires_grad:
        tensor.register_hook(lambda grad: trim_host_heap())


def _in_backward() -> bool:
    # A checkpointed piece's recompute runs its forward inside backward: its trims were taken by the gradient hooks.
    return torch._C._current_graph_task_id() != -1


def attach_host_heap_trims(original_encoder: nn.Module, text_encoder: nn.Module, unet: nn.Module, vae: nn.Module,
                           rewards: nn.Module) -> list:
    """Trim the host heap at each boundary of a training step, by module hooks (the loop never calls a trim):

        forward:   as the step starts (the original encoder's call), before and after the VAE decode (its first
                   and last layers), after the rewards (what backward starts from)
        backward:  as the gradient reaches the decoded images, each graph-carrying UNet call's output (before its
                   checkpointed recompute) and the trained encoder's output (before its backward)

    A piece's freed activations would otherwise stay resident into the next one's peak. Returns the hook handles."""
    decoder = vae.decoder
    first = getattr(vae, "post_quant_conv", None) or decoder.conv_in
    def trim(*_) -> None:
        if not _in_backward():
            trim_host_heap()

    def after_decode(module, args, out) -> None:
        if not _in_backward():
            trim_host_heap()
            _trim_on_grad(out)

    grad_trim = lambda module, args, out: _trim_on_grad(out)

    handles = [original_encoder.register_forward_pre_hook(trim), first.register_forward_pre_hook(trim),
               decoder.conv_out.register_forward_hook(after_decode), rewards.register_forward_hook(trim),
               unet.register_forward_hook(grad_trim)]
    if text_encoder is not original_encoder:
        handles.append(text_encoder.register_forward_hook(grad_trim))
    return handles
