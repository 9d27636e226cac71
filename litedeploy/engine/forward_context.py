"""Per-step inputs of the model and the paged attention backend that reads them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from litedeploy import kernels
from litedeploy.engine.kv_cache import KVCache
from litedeploy.kernels import reference


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [num_tokens]
    positions: torch.Tensor        # [num_tokens]
    rope_lens: torch.Tensor        # [num_tokens]: the sequence's last position in this step + 1
    slot_mapping: torch.Tensor     # [num_tokens] flat cache slot of each token
    block_tables: torch.Tensor     # [batch, max_blocks] int32
    context_lens: torch.Tensor     # [batch] cached prefix + this step's tokens
    cu_seqlens_q: torch.Tensor     # [batch + 1]
    logits_indices: torch.Tensor | None  # [num_sampling_rows] rows to sample from; None: all
    max_q_len: int
    max_context_len: int
    # CUDA, mixed batches: the leading rows that decode one token go to the decode kernel, the
    # rest (prefill chunks, cu_seqlens rebased to 0) to the prefill kernel
    num_decode_rows: int = 0
    decode_max_context_len: int = 0
    prefill_cu_seqlens_q: torch.Tensor | None = None


class PagedKVBackend:
    """Stores this step's K/V by slot mapping, then attends over each sequence's blocks."""

    def __init__(self, kv_cache: KVCache, inputs: StepInputs, scale: float):
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.scale = scale
        # CPU: the torch twin's host work (slot runs, buckets, block ids, masks), once per step
        self._cpu_plans: tuple[reference.StorePlan, reference.AttentionPlan] | None = None

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        step, cache = self.inputs, self.kv_cache
        k_cache = cache.k_caches[layer_idx]
        v_cache = cache.v_caches[layer_idx]
        # quantized caches: (k scales/zeros, v scales/zeros, bits) ride along; float: nothing
        quant = ((cache.k_scales_zeros[layer_idx], cache.v_scales_zeros[layer_idx],
                  cache.quant_bits) if cache.quant_bits else ())
        if k_cache.device.type == "cpu":
            return self._attend_cpu(q, k, v, k_cache, v_cache, quant)
        kernels.store_kv(k, v, k_cache, v_cache, step.slot_mapping, *quant)
        return self._attend_stored(q, k_cache, v_cache, quant)

    def attend_rotary(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                      cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """RoPE on q and k, then `attend`. CUDA with a float cache: one launch rotates q in
        place and k on its way into the cache (k itself stays unrotated; only the cache is read
        after). Elsewhere (CPU, quantized caches) `apply_rope` then `attend`, as before."""
        cache = self.kv_cache
        if not cache.quant_bits and kernels.rope_store_kv(
                q, k, v, cos, sin, cache.k_caches[layer_idx], cache.v_caches[layer_idx],
                self.inputs.slot_mapping):
            return self._attend_stored(q, cache.k_caches[layer_idx], cache.v_caches[layer_idx], ())
        q, k = kernels.apply_rope(q, k, cos, sin)
        return self.attend(layer_idx, q, k, v)

    def _attend_stored(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                       quant: tuple) -> torch.Tensor:
        """CUDA attention over the cache that already holds this step's K/V."""
        step = self.inputs
        if step.prefill_cu_seqlens_q is not None:
            return self._attend_split(q, k_cache, v_cache, quant)
        return kernels.paged_attention(
            q, k_cache, v_cache, step.block_tables, step.context_lens, step.cu_seqlens_q,
            step.max_q_len, step.max_context_len, self.scale, *quant,
        )

    def _attend_cpu(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    k_cache: torch.Tensor, v_cache: torch.Tensor, quant: tuple):
        if self._cpu_plans is None:
            step = self.inputs
            self._cpu_plans = (reference.plan_store(step.slot_mapping), reference.plan_attention(
                step.block_tables, step.context_lens, step.cu_seqlens_q, k_cache.shape[1]))
        store_plan, attention_plan = self._cpu_plans
        reference.store_kv_planned(k, v, k_cache, v_cache, store_plan, *quant)
        return reference.paged_attention_planned(q, k_cache, v_cache, attention_plan,
                                                 self.scale, *quant)

    def _attend_split(self, q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                      quant: tuple):
        """Decode rows through the GQA-packed split-K decode kernel, prefill rows through the
        prefill kernel: in one prefill launch a decode row would fill 1 of 64 query slots."""
        step, n = self.inputs, self.inputs.num_decode_rows
        decoded = kernels.paged_attention(
            q[:n], k_cache, v_cache, step.block_tables[:n], step.context_lens[:n],
            step.cu_seqlens_q[: n + 1], 1, step.decode_max_context_len, self.scale, *quant,
        )
        prefilled = kernels.paged_attention(
            q[n:], k_cache, v_cache, step.block_tables[n:], step.context_lens[n:],
            step.prefill_cu_seqlens_q, step.max_q_len, step.max_context_len, self.scale,
            *quant,
        )
        return torch.cat([decoded, prefilled])
