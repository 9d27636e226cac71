"""The paged K/V memory: one [num_blocks, block_size, kv_heads, head_dim] pair per layer.

Its size follows lmdeploy's `cache_max_entry_count`: on GPU the fraction of free memory after the
weights are loaded and a warm-up forward has reserved its activations (model_runner.warm_up_model);
on CPU the fraction of available RAM. `max_cache_tokens` overrides both.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch

from litedeploy.config import CacheConfig, ModelConfig

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class CacheShape:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype

    @property
    def bytes_per_token(self) -> int:
        element = torch.tensor([], dtype=self.dtype).element_size()
        return 2 * self.num_layers * self.num_kv_heads * self.head_dim * element

    @property
    def num_tokens(self) -> int:
        return self.num_blocks * self.block_size

    @property
    def size_gib(self) -> float:
        return self.num_tokens * self.bytes_per_token / 2**30


def available_memory_bytes(device: torch.device) -> int:
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return free
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return 4 * 2**30  # unknown platform: assume a modest 4 GiB


def plan_cache(
    model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
    device: torch.device, max_useful_tokens: int,
) -> CacheShape:
    """Number of blocks from the memory budget, capped at what the engine could ever use."""
    shape = CacheShape(0, cache_config.block_size, model_config.num_layers,
                       model_config.num_kv_heads, model_config.head_dim, dtype)
    if cache_config.max_cache_tokens:
        num_tokens = cache_config.max_cache_tokens
    else:
        free_bytes = available_memory_bytes(device)
        budget = free_bytes * cache_config.cache_max_entry_count
        num_tokens = min(int(budget // shape.bytes_per_token), max_useful_tokens)
        logger.info("KV cache budget: %.2f of %.2f GiB free -> %d tokens (%d bytes/token)",
                    cache_config.cache_max_entry_count, free_bytes / 2**30, num_tokens,
                    shape.bytes_per_token)
    num_blocks = max(1, num_tokens // cache_config.block_size)
    return CacheShape(num_blocks, cache_config.block_size, model_config.num_layers,
                      model_config.num_kv_heads, model_config.head_dim, dtype)


class KVCache:
    def __init__(self, shape: CacheShape, device: torch.device, quiet: bool = False):
        self.shape = shape
        per_layer = (shape.num_blocks, shape.block_size, shape.num_kv_heads, shape.head_dim)
        # empty, not zeros: pages of a CPU cache are only touched when used
        self.k_caches = [torch.empty(per_layer, dtype=shape.dtype, device=device)
                         for _ in range(shape.num_layers)]
        self.v_caches = [torch.empty(per_layer, dtype=shape.dtype, device=device)
                         for _ in range(shape.num_layers)]
        if not quiet:
            logger.info("KV cache: %d blocks x %d = %d tokens, %.2f GiB", shape.num_blocks,
                        shape.block_size, shape.num_tokens, shape.size_gib)
