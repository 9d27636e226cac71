"""`litedeploy bench sweep`: the decode latency of a ladder of batch sizes, in one process.

One engine serves every rung (loaded and CUDA-graph-captured once); on CUDA the copy bandwidth is
measured first, so the result carries its own roofline (see `litedeploy.bench.plots`).
"""

from __future__ import annotations

import sys

import torch
from tqdm.auto import tqdm

from litedeploy.bench.common import engine_info, machine_info
from litedeploy.bench.latency import run_latency
from litedeploy.engine.engine import LLMEngine


def batch_ladder(max_batch_size: int) -> list[int]:
    """1, 2, 4, ... up to max_batch_size (included even when not a power of two)."""
    ladder, size = [], 1
    while size < max_batch_size:
        ladder.append(size)
        size *= 2
    return [*ladder, max_batch_size]


def measured_bandwidth(device: torch.device) -> dict | None:
    if device.type != "cuda":
        return None  # no reliable CPU figure: the plot then shows no roofline
    from litedeploy.bench.copy_bandwidth import measure_copy_bandwidth

    return measure_copy_bandwidth(device, size_gib=2.0, num_iters=5)


def run_sweep(engine: LLMEngine, batch_sizes: list[int], input_len: int, output_len: int,
              num_iters: int = 3) -> dict:
    copy = measured_bandwidth(engine.device)
    runs = []
    bar = tqdm(batch_sizes, desc="Batch sizes", unit="batch", disable=not sys.stderr.isatty())
    for batch_size in bar:
        bar.set_postfix_str(f"batch {batch_size}")
        run = run_latency(engine, batch_size, input_len, output_len, num_iters)
        runs.append({key: value for key, value in run.items()
                     if key not in ("engine_info", "machine")})
    return {"benchmark": "latency_sweep", "model": engine.bundle.name,
            "dtype": str(engine.bundle.dtype), "input_len": input_len, "output_len": output_len,
            "num_iters": num_iters,
            "copy_bandwidth_tb_s": copy["copy_bandwidth_tb_s"] if copy else None,
            "engine_info": engine_info(engine), "machine": machine_info(engine.device),
            "runs": runs}
