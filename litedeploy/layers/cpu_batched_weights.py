"""bf16 copies of a small model's 4- and 8-bit weights, for CPU steps of many rows.

PyTorch's weight-only kernels on CPU (`_weight_int4pack_mm_for_cpu`, `_weight_int8pack_mm`)
stream the packed bytes well for one row, but dequantize every weight tile again for each block
of rows: their time grows with the rows. At 32 rows (a busy server's decode step) they take
~2x (int4 linears) and ~3x (the int8 LM head) a oneDNN bf16 GEMM over the same weights, so a
served step ran at 180 ms instead of ~80 (benchmarks/results/cpu.md). For a small model a bf16
copy is cheap (the embedded SmolLM2-135M: 0.27 GB) and serves every step of BATCHED_MIN_ROWS or
more rows (decode of many rows, prefill); fewer rows keep the packed kernels, which win there.

It is kept only where the engine batches (max batch > 1: not `litedeploy chat`) and only while
the copies fit in the budget: LITEDEPLOY_CPU_BF16_COPY_GB (default 1; 0 keeps none).
"""

from __future__ import annotations

import logging
import os

import torch
from torch import nn

logger = logging.getLogger(__name__)

BATCHED_MIN_ROWS = 8  # rows from which the bf16 GEMM beats the packed kernels (2-core AVX-512)
BUDGET_ENV = "LITEDEPLOY_CPU_BF16_COPY_GB"
DEFAULT_BUDGET_GB = 1.0


def budget_bytes() -> int:
    raw = os.environ.get(BUDGET_ENV, "").strip()
    try:
        gigabytes = float(raw) if raw else DEFAULT_BUDGET_GB
    except ValueError:
        logger.warning("%s=%r is not a number; using %s", BUDGET_ENV, raw, DEFAULT_BUDGET_GB)
        gigabytes = DEFAULT_BUDGET_GB
    return int(max(gigabytes, 0.0) * 2**30)


def takes_bf16_copy(rows: int | torch.SymInt) -> bool:
    """Whether a step of `rows` rows goes through the bf16 copy. Inside a compiled graph whose
    batch size is symbolic, the graph's own range decides (CompiledCPUDecode compiles one graph
    for 2..BATCHED_MIN_ROWS-1 rows and one for more): comparing the symbol is then static."""
    return bool(rows >= BATCHED_MIN_ROWS)


def has_bf16_copies(model: nn.Module) -> bool:
    return any(getattr(m, "bf16_copy", None) is not None for m in model.modules())


def attach_bf16_copies(model: nn.Module, max_batch_size: int) -> int:
    """Give every CPU-kernel Int4Linear/Int8Linear of `model` its bf16 copy when the engine
    batches and all copies fit in the budget; returns the bytes taken (0: none kept)."""
    from litedeploy.layers.quant_linear import Int4Linear, Int8Linear

    if max_batch_size < 2:
        return 0
    modules = [m for m in model.modules()
               if isinstance(m, (Int4Linear, Int8Linear)) and m.can_keep_bf16_copy()]
    need = sum(2 * m.in_features * m.out_features for m in modules)
    if not modules or need > budget_bytes():
        if modules:
            logger.info("no bf16 copies of the quantized weights: %.2f GiB > %s %.2f GiB",
                        need / 2**30, BUDGET_ENV, budget_bytes() / 2**30)
        return 0
    for module in modules:
        module.keep_bf16_copy()
    logger.info("bf16 copies of %d quantized linears for steps of >= %d rows: %.2f GiB",
                len(modules), BATCHED_MIN_ROWS, need / 2**30)
    return need
