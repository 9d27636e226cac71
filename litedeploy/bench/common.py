"""Shared pieces of the benchmarks: random prompts, percentiles, machine facts, JSON output."""

from __future__ import annotations

import json
import os
import platform
import random
import sys
from pathlib import Path

import torch


def random_prompts(num_prompts: int, input_len: int, vocab_size: int, range_ratio: float = 0.0,
                   seed: int = 0) -> list[list[int]]:
    """Token-id prompts of length input_len * U[1 - ratio, 1 + ratio], ids away from specials."""
    rng = random.Random(seed)
    low = max(1, int(input_len * (1 - range_ratio)))
    high = max(low, int(input_len * (1 + range_ratio)))
    first_id = min(1000, vocab_size // 4)
    return [[rng.randrange(first_id, vocab_size) for _ in range(rng.randint(low, high))]
            for _ in range(num_prompts)]


def output_lens(num_prompts: int, output_len: int, range_ratio: float, seed: int = 1) -> list[int]:
    rng = random.Random(seed)
    low = max(1, int(output_len * (1 - range_ratio)))
    high = max(low, int(output_len * (1 + range_ratio)))
    return [rng.randint(low, high) for _ in range(num_prompts)]


def percentile(values: list[float], pct: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    index = min(len(ordered) - 1, max(0, round(pct / 100 * (len(ordered) - 1))))
    return ordered[index]


def machine_info(device: torch.device) -> dict:
    info = {
        "python": sys.version.split()[0],
        "torch": torch.__version__,
        "platform": platform.platform(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "device": str(device),
    }
    if device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(device)
    return info


def write_json(result: dict, path: str | None) -> None:
    text = json.dumps(result, indent=2)
    if path:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        Path(path).write_text(text + "\n")
    print(text)


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def engine_info(engine) -> dict:
    """KV cache size, CUDA graph ladder and the bytes a batch-1 decode step must read."""
    shape = engine.kv_cache.shape
    graphs = engine.runner.graphs
    weight_bytes = sum(p.numel() * p.element_size() for name, p in
                       engine.bundle.model.named_parameters() if "embed_tokens" not in name)
    return {
        "kv_cache_tokens": shape.num_tokens, "kv_cache_gib": shape.size_gib,
        "cuda_graph_batch_sizes": graphs.sizes if graphs is not None else [],
        "max_batch_size": engine.config.max_batch_size, "session_len": engine.session_len,
        "weight_bytes_read_per_step": weight_bytes,
    }
