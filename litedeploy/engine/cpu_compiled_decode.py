"""Batch-1 decode on CPU compiled whole with torch.compile: the CPU counterpart of CUDA graphs.

At batch 1 on a small CPU, eager PyTorch spends more time dispatching the ~60 small ops of each
layer (norms, RoPE, casts, the paged-attention gather and masking) than in the weight-only
quantized matmuls themselves. Compiling the whole step (embedding, every layer, LM head) lets
Inductor fuse each run of small ops into one C++ loop; the quantized matmuls stay PyTorch's kernels.

One graph serves every context length: the block table's length is a dynamic dimension, and the
attention reads whole blocks and masks the slots past the context (a table of 1 block gets its
own specialized graph, so two graphs in all). Both are compiled when this object is made, before
any request runs: the warm-up writes one slot of block 0, which holds nothing yet.

Only plain decode steps of one sequence come here (`can_run`); prefill, batches and quantized KV
caches keep the eager path. Numerically the fused kernels match eager up to rounding order.
"""

from __future__ import annotations

import logging
import time

import numpy as np
import torch

from litedeploy.engine.input_builder import HostStepInputs
from litedeploy.engine.kv_cache import KVCache
from litedeploy.models.decoder import DecoderForCausalLM

logger = logging.getLogger(__name__)


class _WholeBlocksBackend:
    """Paged attention of one decode token, written with static-shaped ops only (no host reads of
    the context length), so the compiler can trace it: store the new K/V, gather the sequence's
    blocks, mask the slots at or past `context_len`."""

    def __init__(self, kv_cache: KVCache, slot: torch.Tensor, table: torch.Tensor,
                 context_len: torch.Tensor, scale: float):
        self.kv_cache, self.slot, self.table = kv_cache, slot, table
        self.context_len, self.scale = context_len, scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        k_cache, v_cache = self.kv_cache.k_caches[layer_idx], self.kv_cache.v_caches[layer_idx]
        _, num_heads, head_dim = q.shape
        num_kv_heads = k_cache.shape[2]
        k_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot, k.to(k_cache.dtype))
        v_cache.view(-1, num_kv_heads, head_dim).index_copy_(0, self.slot, v.to(v_cache.dtype))
        keys = k_cache.index_select(0, self.table).view(-1, num_kv_heads, head_dim)  # [L, KVH, D]
        values = v_cache.index_select(0, self.table).view(-1, num_kv_heads, head_dim)
        valid = torch.arange(keys.shape[0], device=q.device) < self.context_len  # [L]
        # slots past the context hold whatever the cache had, possibly NaN bits: zero them, or
        # 0 * NaN would leak through the probabilities
        values = torch.where(valid[:, None, None], values, 0).to(q.dtype)
        group = num_heads // num_kv_heads
        grouped_q = q.view(num_kv_heads, group, 1, head_dim)
        # broadcast-and-sum instead of bmm: Inductor fuses these into its own loops
        scores = (grouped_q * keys.to(q.dtype).permute(1, 0, 2)[:, None]).sum(-1) * self.scale
        scores = scores.float().masked_fill(~valid, float("-inf"))  # [KVH, G, L]
        probs = scores.softmax(dim=-1).to(q.dtype)
        out = (probs[..., None] * values.permute(1, 0, 2)[:, None]).sum(2)  # [KVH, G, D]
        return out.reshape(1, num_heads, head_dim)


def _decode_step(model: DecoderForCausalLM, kv_cache: KVCache, input_ids: torch.Tensor,
                 positions: torch.Tensor, rope_lens: torch.Tensor | None, slot: torch.Tensor,
                 table: torch.Tensor, context_len: torch.Tensor, scale: float) -> torch.Tensor:
    backend = _WholeBlocksBackend(kv_cache, slot, table, context_len, scale)
    hidden = model(input_ids, positions, backend, rope_lens)
    return model.compute_logits(hidden)


# Before each call the compiled step checks ~3000 guards on its ~370 input tensors (weights, KV
# caches): ~0.9 ms of a ~9.5 ms step. Guarding whole modules by their dict tags (unchanged dict:
# skip the subtree) halves that; the weights and caches are never reassigned after loading.
_CHEAP_GUARDS = torch._dynamo.config.patch(use_recursive_dict_tags_for_guards=True,
                                           max_saved_pointers_for_recursive_dict_tags_check=4096)


class CompiledCPUDecode:
    """Plugs into ModelRunner where the CUDA graphs go (`can_run(host)` / `run(host)`)."""

    def __init__(self, model: DecoderForCausalLM, kv_cache: KVCache, scale: float):
        self.sizes = [1]  # the batch sizes it serves (engine_info reports the runner's graphs')
        if kv_cache.quant_bits:
            raise ValueError("the compiled CPU decode needs a float KV cache (--quant-policy 0)")
        if model.config.tp_size != 1:
            raise ValueError("the compiled CPU decode runs with --tp 1 only")
        self.model, self.kv_cache, self.scale = model, kv_cache, scale
        self.block_size = kv_cache.shape.block_size
        self.dynamic_rope = model.rotary.is_dynamic
        for cache in (*kv_cache.k_caches, *kv_cache.v_caches):
            # the cache's size follows free memory: keep it out of the graph (and of the key of
            # Inductor's on-disk cache, which then serves later runs: ~10 s instead of minutes)
            torch._dynamo.mark_dynamic(cache, 0)
        self._step = torch.compile(_decode_step, fullgraph=True)
        self.compile_seconds = self._warm_up()

    def can_run(self, host: HostStepInputs, num_steps: int = 1) -> bool:
        """One decode token of one sequence; multi-step bursts keep the eager loop."""
        return (num_steps == 1 and host.batch_size == 1 and host.max_q_len == 1
                and len(host.logits_indices) == 1)

    @torch.inference_mode()
    def run(self, host: HostStepInputs) -> torch.Tensor:
        """Logits [1, vocab] float32 of the one decode token of `host`."""
        return self._run(host.input_ids, host.positions, host.rope_lens, host.slot_mapping,
                         host.block_tables[0], host.context_lens[0])

    @_CHEAP_GUARDS
    def _run(self, input_ids: np.ndarray, positions: np.ndarray, rope_lens: np.ndarray,
             slot_mapping: np.ndarray, block_table: list[int], context_len: int) -> torch.Tensor:
        table = torch.tensor(block_table, dtype=torch.int64)
        torch._dynamo.mark_dynamic(table, 0)  # one graph for every table length >= 2
        return self._step(
            self.model, self.kv_cache, torch.from_numpy(input_ids), torch.from_numpy(positions),
            torch.from_numpy(rope_lens) if self.dynamic_rope else None,
            torch.from_numpy(slot_mapping), table, torch.tensor(context_len), self.scale)

    @torch.inference_mode()
    def _warm_up(self) -> float:
        """Compile both graphs (table of 1 block, table of more) with throwaway steps at slot 0."""
        start = time.perf_counter()
        one = np.zeros(1, dtype=np.int64)
        for num_blocks in (1, 2):
            self._run(one, one, one + 1, one, [0] * num_blocks, 1)
        seconds = time.perf_counter() - start
        logger.info("compiled the CPU decode step in %.1f s", seconds)
        return seconds


def enable_compiled_cpu_decode(engine) -> CompiledCPUDecode:
    """Route an LLMEngine's batch-1 CPU decode steps through the compiled step. Call it right
    after building the engine, before any request (the warm-up writes into the cache)."""
    runner = engine.runner
    if engine.device.type != "cpu" or not hasattr(runner, "graphs"):
        raise ValueError("the compiled CPU decode needs a single-process engine on CPU")
    if engine.has_unfinished():
        raise ValueError("enable the compiled CPU decode before adding requests")
    runner.graphs = CompiledCPUDecode(runner.model, runner.kv_cache, runner.scale)
    return runner.graphs
