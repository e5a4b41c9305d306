"""The speed options of ``[ops]`` that change how the built models run, not what they compute: TF32 matmuls,
channels-last weights and torch.compile. Applied once, after the op swaps (``ops.apply_ops``), to every module
the sampler, the decoder and the rewards call.

- ``ops.tf32``: on CUDA, fp32 matmuls and cuDNN convolutions on TF32 tensor cores. Process-wide flags, set at
  build and left set (as diffusers' ``--allow_tf32``); ``false`` sets strict fp32.
- ``ops.channels_last``: the UNet's and VAE's 4-D weights in NHWC, so each convolution runs NHWC (cuDNN's tensor-
  core layout) and returns NHWC activations, which the next convolution takes as they are.
- ``ops.compile``: ``nn.Module.compile()`` (in place: the state_dict keys, the parameters and everything that
  saves or exports them stay as they are) of the UNet, the VAE decoder and each reward tower's vision side. The
  sampler's checkpointed UNet calls run the compiled forward both times, once with and once without
  recording; ``checkpoint_vae = "blocks"`` calls the decoder's stages one by one and so bypasses its compiled
  forward (the log line says so).
"""
from __future__ import annotations

import logging
from typing import Mapping, Sequence

import torch
from torch import nn

from ..config import OpsConfig

logger = logging.getLogger(__name__)


def set_tf32(enabled: bool, device: torch.device) -> None:
    """TF32 for fp32 matmuls and convolutions on CUDA, or strict fp32; nothing on other devices."""
    if device.type != "cuda":
        return
    torch.backends.cuda.matmul.allow_tf32 = enabled
    torch.backends.cudnn.allow_tf32 = enabled


def to_channels_last(models: Mapping[str, nn.Module]) -> int:
    """NHWC weights for every module in `models`; returns how many 4-D parameters changed layout."""
    count = 0
    for model in models.values():
        count += sum(p.dim() == 4 for p in model.parameters())
        model.to(memory_format=torch.channels_last)
    return count


def compile_modules(modules: Mapping[str, nn.Module], backend: str = "inductor") -> list[str]:
    """``nn.Module.compile(backend=...)`` each module in place; returns the names compiled."""
    for module in modules.values():
        module.compile(backend=backend)
    return list(modules)


def apply_speed_options(ops: OpsConfig, device: torch.device, unets: Mapping[str, nn.Module], vae: nn.Module,
                        towers: Sequence[nn.Module], vae_blocks: bool) -> dict[str, object]:
    """Apply ``ops.tf32``, ``ops.channels_last`` and ``ops.compile`` (to the UNets, the VAE decoder and the reward
    towers' image sides, `towers`); log and return what was done."""
    set_tf32(ops.tf32, device)
    done: dict[str, object] = {"tf32": ops.tf32 and device.type == "cuda"}
    done["channels_last"] = to_channels_last({**unets, "vae": vae}) if ops.channels_last else 0
    compiled: list[str] = []
    if ops.compile and ops.compile_backend == "inductor" and device.type == "cpu":
        logger.warning("ops.compile with inductor on CPU: with torch 2.13 its generated backward gave a tiny UNet an "
                       "encoder gradient 3.8%% off eager's (docs/performance.md); compile is meant for CUDA, or set "
                       "ops.compile_backend=aot_eager_decomp_partition")
    if ops.compile:
        targets: dict[str, nn.Module] = {**unets, "vae.decoder": vae.decoder}
        for i, tower in enumerate(towers):
            targets[f"reward tower {i}"] = tower
        compiled = compile_modules(targets, ops.compile_backend)
    done["compiled"] = compiled
    if device.type == "cuda" or ops.channels_last or compiled:
        note = " (checkpoint_vae='blocks' calls the decoder's stages directly: they run eager)" if (
            compiled and vae_blocks) else ""
        logger.info("speed: TF32 %s, channels_last %s, torch.compile %s%s",
                    "on" if done["tf32"] else "off", f"({done['channels_last']} weights)" if ops.channels_last
                    else "off", f"({ops.compile_backend}) " + ", ".join(compiled) if compiled else "off", note)
    return done
