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


def weight_bytes(model: torch.nn.Module, skip_embedding: bool = False) -> int:
    """Bytes of the weights as they sit on the device: parameters and buffers, plus the repacked
    tensors quantized linears keep for their kernels (`kernel_tensors`, `scales_bf16`) once their
    load-time parameters are freed. Each storage is counted once (tied embeddings)."""
    seen: set[int] = set()
    total = 0
    for module_name, module in model.named_modules():
        if skip_embedding and "embed_tokens" in module_name:
            continue
        tensors = [*module.parameters(recurse=False), *module.buffers(recurse=False)]
        for value in vars(module).values():
            if isinstance(value, torch.Tensor):
                tensors.append(value)
            elif isinstance(value, (tuple, list)):
                tensors += [item for item in value if isinstance(item, torch.Tensor)]
        for tensor in tensors:
            key = tensor.untyped_storage().data_ptr() if tensor.numel() else id(tensor)
            if key not in seen:
                seen.add(key)
                total += tensor.numel() * tensor.element_size()
    return total


def gpu_memory_info(device: torch.device) -> dict:
    """PyTorch's CUDA allocator figures so far (empty on CPU)."""
    if device.type != "cuda":
        return {}
    return {"gpu_memory_allocated_gib": torch.cuda.memory_allocated(device) / 2**30,
            "gpu_memory_reserved_gib": torch.cuda.memory_reserved(device) / 2**30,
            "gpu_max_memory_allocated_gib": torch.cuda.max_memory_allocated(device) / 2**30,
            "gpu_max_memory_reserved_gib": torch.cuda.max_memory_reserved(device) / 2**30}


def engine_info(engine) -> dict:
    """KV cache size, CUDA graph ladder, the weights' memory and the bytes a batch-1 decode step
    must read."""
    shape = engine.kv_cache.shape
    graphs = engine.runner.graphs
    model = engine.bundle.model
    allocated = getattr(engine.bundle, "weights_allocated_bytes", None)
    return {
        "kv_cache_tokens": shape.num_tokens, "kv_cache_gib": shape.size_gib,
        "kv_quant_policy": shape.quant_policy,
        "cuda_graph_batch_sizes": graphs.sizes if graphs is not None else [],
        "max_batch_size": engine.config.max_batch_size, "session_len": engine.session_len,
        "weight_bytes_read_per_step": weight_bytes(model, skip_embedding=True),
        "weights_gib": weight_bytes(model) / 2**30,
        # what the CUDA allocator held right after loading (weights only, on GPU)
        "weights_allocated_gib": allocated / 2**30 if allocated is not None else None,
        "model_format": engine.config.model_format, "load_format": engine.config.load_format,
        "max_gpu_memory_gib": getattr(engine.config, "max_gpu_memory", None),
        **gpu_memory_info(engine.device),
    }
