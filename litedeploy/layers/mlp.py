"""SwiGLU feed-forward with a packed gate/up projection."""

from __future__ import annotations

import torch
from torch import nn

from litedeploy import kernels
from litedeploy.distributed.parallel_state import all_reduce


class GatedMLP(nn.Module):
    def __init__(self, hidden_size: int, intermediate_size: int):
        super().__init__()
        self.intermediate_size = intermediate_size
        # rows [gate | up]
        self.gate_up_proj = nn.Linear(hidden_size, 2 * intermediate_size, bias=False)
        self.down_proj = nn.Linear(intermediate_size, hidden_size, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate_up = self.gate_up_proj(x)
        # CUDA, one row: silu(gate) * up computed inside down_proj's GEMV (one launch fewer)
        out = kernels.silu_mul_linear(gate_up, self.down_proj)
        if out is None:
            # silu(gate) * up, fused into one kernel on CUDA
            out = self.down_proj(kernels.silu_and_mul(gate_up))
        # row-parallel under TP: each rank holds a slice of the intermediate features
        return all_reduce(out)
