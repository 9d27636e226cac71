"""The paged K/V memory: one [num_blocks, block_size, kv_heads, head_dim] pair per layer.

With `quant_policy` 8 or 4 (lmdeploy's KV int8 / int4) the pair holds uint8 codes (int4: two per
byte, last dim head_dim / 2) plus one float32 (scale, zero) pair per slot and KV head
[num_blocks, block_size, kv_heads, 2] for K and for V, allocated once (CUDA graphs capture their
addresses). The token budget counts those bytes, so the same memory holds ~2x (int8) / ~3.5x
(int4) the tokens of a bfloat16 cache.

Its size follows lmdeploy's `cache_max_entry_count`: on GPU the fraction of free memory after the
weights are loaded and a warm-up forward has reserved its activations (model_runner.warm_up_model);
on CPU the fraction of available RAM, at most CPU_MAX_CACHE_BYTES. A size from memory is capped
at `max_useful_tokens` (max_batch_size x session_len); `max_cache_tokens` overrides both. Under
`--max-gpu-memory` the free memory is what the cap leaves: the cap minus what PyTorch has reserved
(weights and the warm-up's activations), as `mem_get_info` knows nothing of the cap.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable
from dataclasses import dataclass

import torch

from litedeploy.config import CacheConfig, ModelConfig
from litedeploy.errors import ModelLoadError
from litedeploy.kernels.kv_quant import check_quant_bits, packed_head_dim

logger = logging.getLogger(__name__)

SCALE_ZERO_BYTES = 4  # float32 scale and zero (see kernels/kv_quant.py)
# Default ceiling of a CPU cache sized from RAM (--cache-max-tokens sets any size): a CPU engine
# runs a few sequences at a time, and 80% of a large machine's RAM is a reservation no other
# process can count on.
CPU_MAX_CACHE_BYTES = 4 * 2**30


@dataclass(frozen=True)
class CacheShape:
    num_blocks: int
    block_size: int
    num_layers: int
    num_kv_heads: int
    head_dim: int
    dtype: torch.dtype  # the model's dtype: what attention computes in
    quant_policy: int = 0  # 0 = float cache, 8 = int8 codes, 4 = int4 codes

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.num_layers * self.num_kv_heads * self.bytes_per_head_slot

    @property
    def bytes_per_head_slot(self) -> int:
        """Bytes of one K (or V) vector of one head: codes plus its float32 scale and zero."""
        if not self.quant_policy:
            return self.head_dim * torch.tensor([], dtype=self.dtype).element_size()
        return packed_head_dim(self.head_dim, self.quant_policy) + 2 * SCALE_ZERO_BYTES

    @property
    def float_bytes_per_token(self) -> int:
        """What the same cache would take unquantized (for the start-up line)."""
        return dataclasses.replace(self, quant_policy=0).bytes_per_token

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


def free_memory_bytes(device: torch.device, cap_bytes: int | None) -> int:
    """Free memory; under a cap (CUDA) no more than the cap leaves beside PyTorch's reserved pool."""
    free = available_memory_bytes(device)
    if cap_bytes is not None:
        free = min(free, cap_bytes - torch.cuda.memory_reserved(device))
    return max(0, free)


def plan_cache(
    model_config: ModelConfig, cache_config: CacheConfig, dtype: torch.dtype,
    device: torch.device, max_useful_tokens: int,
    min_free_across_ranks: Callable[[int | None, int], int] | None = None,
) -> CacheShape:
    """Number of blocks from the memory budget, capped at what the engine could ever use.

    Under tensor parallelism `min_free_across_ranks(cap_bytes, own_free_bytes)` returns the least
    free memory of any rank (WorkerGroup.min_free_memory): all ranks hold the same blocks."""
    check_quant_bits(cache_config.quant_policy)
    shape = CacheShape(0, cache_config.block_size, model_config.num_layers,
                       model_config.num_kv_heads, model_config.head_dim, dtype,
                       cache_config.quant_policy)
    cap_bytes = _cap_bytes(cache_config, device)
    if cache_config.max_cache_tokens:
        num_tokens = cache_config.max_cache_tokens
        if cap_bytes is not None:
            _check_fits(num_tokens * shape.bytes_per_token, cap_bytes, device,
                        f"--cache-max-tokens {num_tokens}")
    else:
        free_bytes = free_memory_bytes(device, cap_bytes)
        if min_free_across_ranks is not None:
            free_bytes = min_free_across_ranks(cap_bytes, free_bytes)
        budget = free_bytes * cache_config.cache_max_entry_count
        if device.type == "cpu":
            budget = min(budget, CPU_MAX_CACHE_BYTES)
        num_tokens = min(int(budget // shape.bytes_per_token), max_useful_tokens)
        cap_note = "" if cap_bytes is None else (
            f" under the --max-gpu-memory {cap_bytes / 2**30:.2f} GiB cap")
        if min_free_across_ranks is not None:
            cap_note += " (the least of the tensor-parallel ranks)"
        logger.info("KV cache budget: %.2f of %.2f GiB free%s -> %d tokens (%d bytes/token%s)",
                    cache_config.cache_max_entry_count, free_bytes / 2**30, cap_note, num_tokens,
                    shape.bytes_per_token, _quant_note(shape))
        if cap_bytes is not None and num_tokens < cache_config.block_size:
            one_block = cache_config.block_size * shape.bytes_per_token
            _check_fits(one_block / cache_config.cache_max_entry_count, cap_bytes, device,
                        f"one KV cache block of {cache_config.block_size} tokens")
    num_blocks = max(1, num_tokens // cache_config.block_size)
    return dataclasses.replace(shape, num_blocks=num_blocks)


def _cap_bytes(cache_config: CacheConfig, device: torch.device) -> int | None:
    if cache_config.max_gpu_memory is None or device.type != "cuda":
        return None
    return int(cache_config.max_gpu_memory * 2**30)


def _check_fits(need_bytes: float, cap_bytes: int, device: torch.device, what: str) -> None:
    free = free_memory_bytes(device, cap_bytes)
    if need_bytes > free:
        used = torch.cuda.memory_reserved(device)
        raise ModelLoadError(
            f"{what} needs {need_bytes / 2**30:.2f} GiB, but --max-gpu-memory "
            f"{cap_bytes / 2**30:.2f} GiB leaves {free / 2**30:.2f} GiB after the weights and "
            f"activations ({used / 2**30:.2f} GiB); raise the cap, or lower "
            "--max-prefill-token-num / --cache-max-tokens")


def _quant_note(shape: CacheShape) -> str:
    if not shape.quant_policy:
        return ""
    gain = shape.float_bytes_per_token / shape.bytes_per_token
    return (f", KV int{shape.quant_policy}: {gain:.2f}x the tokens of "
            f"{str(shape.dtype).removeprefix('torch.')}")


class KVCache:
    def __init__(self, shape: CacheShape, device: torch.device, quiet: bool = False):
        self.shape = shape
        self.quant_bits = shape.quant_policy
        last_dim = packed_head_dim(shape.head_dim, shape.quant_policy)
        per_layer = (shape.num_blocks, shape.block_size, shape.num_kv_heads, last_dim)
        dtype = torch.uint8 if shape.quant_policy else shape.dtype
        # empty, not zeros: pages of a CPU cache are only touched when used
        self.k_caches = [torch.empty(per_layer, dtype=dtype, device=device)
                         for _ in range(shape.num_layers)]
        self.v_caches = [torch.empty(per_layer, dtype=dtype, device=device)
                         for _ in range(shape.num_layers)]
        # (scale, zero) per slot and head; empty lists for a float cache
        scales_shape = (*per_layer[:3], 2)
        num_scaled = shape.num_layers if shape.quant_policy else 0
        self.k_scales_zeros = [torch.empty(scales_shape, dtype=torch.float32, device=device)
                               for _ in range(num_scaled)]
        self.v_scales_zeros = [torch.empty(scales_shape, dtype=torch.float32, device=device)
                               for _ in range(num_scaled)]
        if not quiet:
            logger.info("KV cache: %d blocks x %d = %d tokens, %.2f GiB%s", shape.num_blocks,
                        shape.block_size, shape.num_tokens, shape.size_gib, _quant_note(shape))
