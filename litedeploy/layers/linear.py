"""float32 weights laid out for one-row steps on CPU.

MKL's float32 GEMV over a row-major [out, in] weight (F.linear of one row) streams ~10 GB/s on a
2-core AVX-512 VM; over the same values stored column-major (so F.linear runs x @ W_t) ~15 GB/s:
35 vs 52 ms for all 540 MB of the default model's linears (benchmarks/results/cpu.md). At 4-32
rows the row-major layout is the faster one, so an engine takes this layout only when it never
batches (max batch size 1, as `litedeploy chat`). Shapes, values and names stay; only strides
change, so loaders, TP shards and the state dict see the same parameters.
"""

from __future__ import annotations

import torch
from torch import nn

from litedeploy.layers.embedding import ParallelLMHead


def column_major_float_weights(model: nn.Module) -> int:
    """Re-lay every float32 CPU linear weight (LM head included; a tied embedding shares it) as
    the transpose of a contiguous [in, out] tensor. Returns how many weights moved."""
    moved = 0
    with torch.no_grad():
        for module in model.modules():
            if not isinstance(module, (nn.Linear, ParallelLMHead)):
                continue
            weight = module.weight
            if weight.dtype != torch.float32 or weight.device.type != "cpu":
                continue
            if weight.is_contiguous():  # a tied head and embedding: one parameter, moved once
                weight.data = weight.data.T.contiguous().T
                moved += 1
    return moved
