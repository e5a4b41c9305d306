"""The module shape shared by the fused GroupNorm(+SiLU) implementations (Triton here, native ops in
textcraftor_fast/native.py): a drop-in ``nn.GroupNorm`` with the same ``weight`` / ``bias`` state_dict keys and an
optional fused SiLU, built from an existing GroupNorm by sharing its parameters. No Triton import: the native
module must load on machines without Triton."""
from __future__ import annotations

import torch
from torch import nn


class FusedGroupNorm(nn.Module):
    """Fields, parameters, ``from_torch`` and repr; subclasses give ``forward``."""

    def __init__(self, num_groups: int, num_channels: int, eps: float = 1e-5, affine: bool = True,
                 silu: bool = False, device=None, dtype=None) -> None:
        super().__init__()
        if num_groups <= 0 or num_channels % num_groups:
            raise ValueError(f"{type(self).__name__}: num_channels {num_channels} is not divisible by num_groups "
                             f"{num_groups}; use a num_groups that divides {num_channels}")
        self.num_groups, self.num_channels, self.eps, self.affine, self.silu = \
            num_groups, num_channels, eps, affine, silu
        if affine:
            self.weight = nn.Parameter(torch.ones(num_channels, device=device, dtype=dtype))
            self.bias = nn.Parameter(torch.zeros(num_channels, device=device, dtype=dtype))
        else:
            self.register_parameter("weight", None)
            self.register_parameter("bias", None)

    @classmethod
    def from_torch(cls, gn: nn.GroupNorm, silu: bool):
        """One sharing ``gn``'s Parameter objects (no copy; requires_grad stays as it was)."""
        m = cls(gn.num_groups, gn.num_channels, gn.eps, affine=False, silu=silu)
        m.affine = gn.affine
        if gn.affine:
            m.weight, m.bias = gn.weight, gn.bias
        return m

    def extra_repr(self) -> str:
        return f"{self.num_groups}, {self.num_channels}, eps={self.eps}, affine={self.affine}, silu={self.silu}"
