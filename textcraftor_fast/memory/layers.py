"""Per-layer gradient checkpointing of the CLIP transformers on the gradient path (sampler.checkpoint_towers).

The image's gradient runs back through every layer of each reward tower's image side, so autograd keeps every
layer's activations: for a ViT-L/14 at 224 px, more per image than the K = 5 checkpointed UNet calls together
(docs/performance.md). Checkpointed one layer at a time, a tower keeps its 24 layer inputs (~1 MiB each) and, in
backward, one recomputed layer's graph; the cost is one more forward of the tower. The trainable text encoder is
done the same way.

transformers' own `gradient_checkpointing_enable` only acts in training mode, and frozen towers stay in eval
mode, so each layer's `forward` is wrapped here instead. Module names and state dicts are unchanged.
"""
from __future__ import annotations

import functools

import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

_ON = "_textcraftor_checkpoint"  # on a wrapped layer: whether the wrapper checkpoints (the memory policy toggles it)


def transformer_layers(model: nn.Module) -> list[nn.Module]:
    """The encoder layers of a transformers CLIP vision or text transformer (any module holding an `encoder`
    with a `layers` ModuleList, however deep)."""
    layers: list[nn.Module] = []
    for module in model.modules():
        stack = getattr(getattr(module, "encoder", None), "layers", None)
        if isinstance(stack, nn.ModuleList):
            layers += [layer for layer in stack if layer not in layers]
    return layers


def _checkpointed(forward, layer: nn.Module, *args, **kwargs):
    if not getattr(layer, _ON) or not torch.is_grad_enabled():  # off, or no graph to save
        return forward(*args, **kwargs)
    return checkpoint(forward, *args, use_reentrant=False, **kwargs)


def checkpoint_modules(modules: list[nn.Module], enabled: bool = True) -> None:
    """Make each of `modules` keep only its inputs when called with grad and recompute its graph in backward
    (`enabled`), or run plain again. A module is wrapped once, whatever the number of calls; toggling is an
    attribute write, cheap enough to do around every call."""
    for module in modules:
        if not hasattr(module, _ON):
            module.forward = functools.partial(_checkpointed, module.forward, module)
        setattr(module, _ON, enabled)


def checkpoint_each_layer(*models: nn.Module, enabled: bool = True) -> int:
    """Make every encoder layer of `models` recompute its activations in backward (`enabled`), or run plain
    again; returns how many layers."""
    layers = [layer for model in models for layer in transformer_layers(model)]
    checkpoint_modules(layers, enabled)
    return len(layers)
