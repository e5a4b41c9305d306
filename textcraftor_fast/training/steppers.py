"""How an optimizer step is taken: one interface, three strategies, built once (`build_optimizer_step`); the
Trainer never asks which one it holds.

    PlainStep        each micro-batch's loss is scaled (a GradScaler, active under fp16 only) and backpropagated;
                     then the gradients are unscaled, checked (NaN guard), clipped and stepped. Launched on several
                     ranks, the trained module is wrapped in DDP, which averages the gradients during the last
                     micro-batch's backward (the earlier ones run under its `no_sync`).
    DeepSpeedStep    distributed.backend = 'deepspeed': DeepSpeed's engine divides by the accumulation steps,
                     averages over ranks, clips and steps inside the last micro-batch's backward.
    InBackwardStep   optim.step_in_backward: each tensor steps the moment backward has finished its gradient, and
                     the gradient is freed at once (`StepInBackward`).

    step.begin(lr)                            zero the gradients, set the learning rate
    with step.micro_batch(last): ...          the forward and `step.backward(loss, scale)` of one micro-batch
    outcome = step.finish(loss, where)        -> StepOutcome(grad_norm, skipped)
    step.optimizer_state()                    for a checkpoint: torch's per-parameter format, whatever the ranks
    step.load_optimizer_state(state)          from any checkpoint (any rank count, with or without DeepSpeed)
    step.state_dict() / load_state_dict()     the loss scaler's few numbers

About optim.step_in_backward. Stepping each trainable tensor inside backward means the whole model's gradients
never exist together (the CLIP-L encoder's are 0.46 GiB in fp32): torchtune's `optimizer_in_bwd`, PyTorch's
tutorial "How to save memory by fusing the optimizer step into the backward pass". The update is the ordinary
one: AdamW (torch or bitsandbytes) is elementwise per tensor, so stepping tensors one at a time gives the same
weights as one step over all of them. What needs every gradient at once cannot run (global-norm clipping,
accumulation, DDP averaging, fp16 loss scaling: config validation refuses them), and the NaN guard works per
tensor: a tensor with a non-finite gradient is not updated (weights and moments untouched) and the step is
reported skipped, but the others have already moved.
"""
from __future__ import annotations

import contextlib
import logging
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ContextManager

import torch
from torch import Tensor, nn

from .optim import grads_finite, set_lr

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepOutcome:
    grad_norm: float
    """The global gradient 2-norm before clipping (NaN when the step was skipped)."""
    skipped: bool
    """The NaN guard skipped the step: no weight moved (step_in_backward: see its note)."""


class OptimizerStep:
    """The interface (module docstring); subclasses override what differs."""

    optimizer: torch.optim.Optimizer

    def begin(self, lr: float) -> None:
        self.optimizer.zero_grad(set_to_none=True)
        set_lr(self.optimizer, lr)

    def micro_batch(self, last: bool) -> ContextManager[None]:
        """Around one micro-batch's forward and backward; `last`: the one after which the step is taken."""
        return contextlib.nullcontext()

    def backward(self, loss: Tensor, scale: float) -> None:
        raise NotImplementedError

    def finish(self, loss: float, where: str) -> StepOutcome:
        """Take (or skip) the step; `loss` is the step's mean loss, `where` names the step in messages."""
        raise NotImplementedError

    def optimizer_state(self) -> Mapping[str, Any]:
        return self.optimizer.state_dict()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        self.optimizer.load_state_dict(state)

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        pass


class PlainStep(OptimizerStep):
    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], max_grad_norm: float | None,
                 nan_guard: bool, fp16: bool, device: torch.device, ddp: nn.Module | None = None) -> None:
        self.optimizer, self.params = optimizer, list(params)
        self.max_grad_norm, self.nan_guard, self.ddp = max_grad_norm, nan_guard, ddp
        self.scaler = torch.amp.GradScaler(device.type, enabled=fp16)

    def micro_batch(self, last: bool) -> ContextManager[None]:
        # DDP averages at the backward of a forward made outside no_sync: once per step, at the last micro-batch.
        return self.ddp.no_sync() if self.ddp is not None and not last else contextlib.nullcontext()

    def backward(self, loss: Tensor, scale: float) -> None:
        self.scaler.scale(loss * scale).backward()

    def finish(self, loss: float, where: str) -> StepOutcome:
        self.scaler.unscale_(self.optimizer)
        finite = math.isfinite(loss) and grads_finite(self.params)
        grad_norm = float(torch.nn.utils.clip_grad_norm_(
            self.params, self.max_grad_norm or float("inf"))) if finite else float("nan")
        skipped = self.nan_guard and not finite
        if skipped:
            self.optimizer.zero_grad(set_to_none=True)
        else:
            self.scaler.step(self.optimizer)
        self.scaler.update()
        return StepOutcome(grad_norm, skipped)

    def state_dict(self) -> dict[str, Any]:
        # A few floats and counters (fp16's loss scale): kept as JSON, so fp16 resumes are exact too.
        return {"scaler": self.scaler.state_dict()}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        if state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])


class DeepSpeedStep(OptimizerStep):
    """`engine` is a parallel.deepspeed_engine.DeepSpeedEncoder around the optimizer."""

    def __init__(self, engine, nan_guard: bool) -> None:
        self.engine, self.optimizer, self.nan_guard = engine, engine.optimizer, nan_guard

    def backward(self, loss: Tensor, scale: float) -> None:
        self.engine.backward_and_step(loss)  # it divides by the accumulation steps itself

    def finish(self, loss: float, where: str) -> StepOutcome:
        norm = self.engine.grad_norm
        if self.nan_guard and not (math.isfinite(loss) and math.isfinite(norm)):
            # The step cannot be skipped: DeepSpeed took it inside the last backward. Stop before saving.
            raise RuntimeError(f"{where}: non-finite loss or gradients under DeepSpeed (loss {loss}, grad norm "
                               f"{norm}); resume from the last checkpoint with a lower optim.lr")
        return StepOutcome(norm, False)

    def optimizer_state(self) -> Mapping[str, Any]:
        # Gathered from the ZeRO shards on every rank (a collective) into torch's per-parameter format, the file a
        # single process writes: it resumes on any number of ranks.
        return self.engine.full_optimizer_state()

    def load_optimizer_state(self, state: Mapping[str, Any]) -> None:
        self.engine.load_full_optimizer_state(state)  # scattered into this rank's shard


class InBackwardStep(OptimizerStep):
    def __init__(self, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], nan_guard: bool) -> None:
        self.optimizer, self.nan_guard = optimizer, nan_guard
        self.hooks = StepInBackward(optimizer, params, nan_guard)

    def begin(self, lr: float) -> None:
        super().begin(lr)
        self.hooks.begin()

    def backward(self, loss: Tensor, scale: float) -> None:
        if self.nan_guard and not math.isfinite(float(loss.detach())):
            return  # backward would step on non-finite gradients: nothing moves, the step is skipped
        (loss * scale).backward()

    def finish(self, loss: float, where: str) -> StepOutcome:
        hooks = self.hooks
        skipped = self.nan_guard and (hooks.skipped > 0 or not math.isfinite(loss))
        if hooks.skipped:
            logger.warning("%s: %d of %d tensors had non-finite gradients and were not updated "
                           "(optim.step_in_backward: the other %d were)", where.capitalize(), hooks.skipped,
                           hooks.skipped + hooks.stepped, hooks.stepped)
        return StepOutcome(hooks.grad_norm if not skipped else float("nan"), skipped)


def build_optimizer_step(cfg, optimizer: torch.optim.Optimizer, params: Sequence[Tensor], device: torch.device,
                         ddp: nn.Module | None = None, deepspeed=None) -> OptimizerStep:
    """The strategy `cfg` (a TrainConfig) asks for: DeepSpeed's when `deepspeed` (a DeepSpeedEncoder) is given,
    stepping in backward under optim.step_in_backward, else plain (with `ddp`, the DDP wrapper, when launched on
    several ranks)."""
    if deepspeed is not None:
        return DeepSpeedStep(deepspeed, cfg.train.nan_guard)
    if cfg.optim.step_in_backward:
        return InBackwardStep(optimizer, params, cfg.train.nan_guard)
    return PlainStep(optimizer, params, cfg.optim.max_grad_norm, cfg.train.nan_guard,
                     cfg.train.mixed_precision == "fp16", device, ddp)


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
