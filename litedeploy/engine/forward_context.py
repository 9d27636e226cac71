"""Per-step inputs of the model and the paged attention backend that reads them."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from litedeploy import kernels
from litedeploy.engine.kv_cache import KVCache


@dataclass
class StepInputs:
    input_ids: torch.Tensor        # [num_tokens]
    positions: torch.Tensor        # [num_tokens]
    rope_lens: torch.Tensor        # [num_tokens]: the sequence's last position in this step + 1
    slot_mapping: torch.Tensor     # [num_tokens] flat cache slot of each token
    block_tables: torch.Tensor     # [batch, max_blocks] int32
    context_lens: torch.Tensor     # [batch] cached prefix + this step's tokens
    cu_seqlens_q: torch.Tensor     # [batch + 1]
    logits_indices: torch.Tensor   # [num_sampling_rows] rows of the hidden states to sample from
    max_q_len: int
    max_context_len: int
    mask: torch.Tensor | None = None  # CPU path: attention mask shared by all layers of the step


class PagedKVBackend:
    """Stores this step's K/V by slot mapping, then attends over each sequence's blocks."""

    def __init__(self, kv_cache: KVCache, inputs: StepInputs, scale: float):
        self.kv_cache = kv_cache
        self.inputs = inputs
        self.scale = scale

    def attend(self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor):
        step = self.inputs
        k_cache = self.kv_cache.k_caches[layer_idx]
        v_cache = self.kv_cache.v_caches[layer_idx]
        kernels.store_kv(k, v, k_cache, v_cache, step.slot_mapping)
        return kernels.paged_attention(
            q, k_cache, v_cache, step.block_tables, step.context_lens, step.cu_seqlens_q,
            step.max_q_len, step.max_context_len, self.scale, step.mask,
        )
