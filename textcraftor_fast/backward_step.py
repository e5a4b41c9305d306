"""optim.step_in_backward: each trainable parameter takes its optimizer step the moment backward has finished its
gradient, and the gradient is freed at once, so the whole model's gradients never exist together (the CLIP-L
encoder's are 0.46 GiB in fp32). The technique of torchtune's `optimizer_in_bwd` and PyTorch's tutorial "How to
save memory by fusing the optimizer step into the backward pass".

The update is the ordinary one: AdamW (torch or bitsandbytes) is elementwise per tensor, so stepping tensors one
at a time gives the same weights as one step over all of them. What needs every gradient at once cannot run
(global-norm clipping, accumulation, DDP averaging, fp16 loss scaling: config validation refuses them), and the
NaN guard works per tensor: a tensor with a non-finite gradient is not updated (weights and moments untouched)
and the step is reported skipped, but the others have already moved."""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor


class StepInBackward:
    """Registers a post-accumulate-grad hook on each parameter that steps `optimizer` for that parameter alone."""

    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], nan_guard: bool) -> None:
        owned = {id(p) for group in optimizer.param_groups for p in group["params"]}
        missing = [tuple(p.shape) for p in params if id(p) not in owned]
        if missing:
            raise ValueError(f"step_in_backward: {len(missing)} trained tensors (shapes {missing[:3]}) are not in "
                             "the optimizer")
        self.optimizer = optimizer
        self.nan_guard = nan_guard
        self._handles = [p.register_post_accumulate_grad_hook(self._step) for p in params]
        self.begin()

    def begin(self) -> None:
        """Start a training step: clears the gradient norm and the counts."""
        self._squared_norm: Tensor | float = 0.0
        self.stepped = 0
        self.skipped = 0

    @property
    def grad_norm(self) -> float:
        """The global 2-norm of this step's gradients (those applied), as clip_grad_norm_ reports it."""
        return math.sqrt(float(self._squared_norm))

    def _step(self, param: Tensor) -> None:
        # One pass over the gradient: its norm is non-finite iff an element is (or the squares overflow float32,
        # a gradient no step should take either).
        norm = torch.linalg.vector_norm(param.grad.detach(), dtype=torch.float32)
        if self.nan_guard and not bool(torch.isfinite(norm)):
            self.skipped += 1
        else:
            self._squared_norm = self._squared_norm + norm.square()
            # Only this parameter has a gradient now (the others are None: not reached yet, or stepped and freed),
            # and optimizers skip parameters without one, so this steps `param` alone.
            self.optimizer.step()
            self.stepped += 1
        param.grad = None

    def remove(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles = []
