"""Self-attention block: packed qkv projection, RoPE, attention through a backend, output proj.

The backend owns the K/V memory: the reference path keeps one contiguous cache per sequence, the
engine a paged cache addressed by block tables. The layer only computes q, k, v and hands them over.
"""

from __future__ import annotations

from typing import Protocol

import torch
from torch import nn

from litedeploy import kernels
from litedeploy.distributed.parallel_state import all_reduce


class AttentionBackend(Protocol):
    def attend(
        self, layer_idx: int, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
    ) -> torch.Tensor:
        """q [T, H, D], k/v [T, KVH, D] for this step's tokens -> attention output [T, H, D]."""
        ...


class Attention(nn.Module):
    def __init__(
        self, layer_idx: int, hidden_size: int, num_heads: int, num_kv_heads: int,
        head_dim: int, qkv_bias: bool,
    ):
        super().__init__()
        self.layer_idx = layer_idx
        self.num_heads = num_heads
        self.num_kv_heads = num_kv_heads
        self.head_dim = head_dim
        self.q_size = num_heads * head_dim
        self.kv_size = num_kv_heads * head_dim
        # internal layout: rows [q | k | v], whatever the checkpoint's layout was
        self.qkv_proj = nn.Linear(hidden_size, self.q_size + 2 * self.kv_size, bias=qkv_bias)
        self.o_proj = nn.Linear(self.q_size, hidden_size, bias=False)

    def forward(
        self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, backend: AttentionBackend
    ) -> torch.Tensor:
        num_tokens = x.shape[0]
        qkv = self.qkv_proj(x)
        q, k, v = qkv.split([self.q_size, self.kv_size, self.kv_size], dim=-1)
        q = q.view(num_tokens, self.num_heads, self.head_dim)
        k = k.view(num_tokens, self.num_kv_heads, self.head_dim)
        v = v.view(num_tokens, self.num_kv_heads, self.head_dim)
        attend_rotary = getattr(backend, "attend_rotary", None)
        if attend_rotary is not None:  # the backend may fuse RoPE into its K/V store
            out = attend_rotary(self.layer_idx, q, k, v, cos, sin)
        else:
            q, k = kernels.apply_rope(q, k, cos, sin)
            out = backend.attend(self.layer_idx, q, k, v)
        # row-parallel under TP: each rank holds some heads, their partial sums add up
        return all_reduce(self.o_proj(out.reshape(num_tokens, self.q_size)))
