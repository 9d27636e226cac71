"""RMSNorm with an optional fused residual add (pre-norm decoder blocks)."""

from __future__ import annotations

import torch
from torch import nn

from litedeploy import kernels


class RMSNorm(nn.Module):
    def __init__(self, hidden_size: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size))
        self.eps = eps

    def forward(
        self, x: torch.Tensor, residual: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Returns (normed, new_residual) where new_residual = x + residual (or x)."""
        return kernels.rms_norm(x, self.weight, self.eps, residual)
