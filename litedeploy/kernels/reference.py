"""Torch twins of every kernel: the CPU path and the oracle that GPU kernels are tested against.

Conventions shared by all implementations (Triton ones must keep the same signatures):
- token-major flat batches: `q` is [num_tokens, num_heads, head_dim], `k`/`v` [num_tokens, num_kv_heads,
  head_dim]; sequences are concatenated, `cu_seqlens_q` [batch + 1] gives their boundaries.
- the paged cache of one layer is `k_cache`/`v_cache` [num_blocks, block_size, num_kv_heads, head_dim].
- `slot_mapping[t]` = block_id * block_size + offset for token t, or -1 for a padded row (no write).
- `block_tables` [batch, max_blocks_per_seq] int32, padded with any valid id (never read past
  `context_lens`); `context_lens[b]` counts every token of sequence b whose K/V is in the cache after
  this step's store, i.e. the cached prefix plus this step's new tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from litedeploy.kernels import kv_quant


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
) -> None:
    """With quant_bits 4/8 the caches hold codes and `*_scales_zeros` [blocks, block_size,
    kv_heads, 2] the (scale, zero) of each slot and head (see kv_quant.py)."""
    valid = slot_mapping >= 0
    if not bool(valid.all()):
        k, v, slot_mapping = k[valid], v[valid], slot_mapping[valid]
    flat_k = k_cache.view(-1, *k_cache.shape[2:])  # [num_blocks * block_size, kv_heads, head_dim]
    flat_v = v_cache.view(-1, *v_cache.shape[2:])
    if quant_bits:
        k, k_sz = kv_quant.quantize(k, quant_bits)
        v, v_sz = kv_quant.quantize(v, quant_bits)
        k_scales_zeros.view(-1, *k_scales_zeros.shape[2:]).index_copy_(0, slot_mapping, k_sz)
        v_scales_zeros.view(-1, *v_scales_zeros.shape[2:]).index_copy_(0, slot_mapping, v_sz)
    flat_k.index_copy_(0, slot_mapping, k.to(flat_k.dtype))
    flat_v.index_copy_(0, slot_mapping, v.to(flat_v.dtype))


def paged_attention_mask(
    q_lens: torch.Tensor, context_lens: torch.Tensor, max_q_len: int, max_context_len: int
) -> torch.Tensor:
    """Boolean mask [batch, 1, max_q_len, max_context_len]: True where a query may attend.

    Query i of sequence b sits at absolute position context_lens[b] - q_lens[b] + i; it sees every
    cached key up to and including its own position. Padded query rows see key 0 so that softmax
    never divides by zero (their output is discarded).
    """
    device = context_lens.device
    q_idx = torch.arange(max_q_len, device=device)
    k_idx = torch.arange(max_context_len, device=device)
    q_pos = (context_lens - q_lens)[:, None] + q_idx[None, :]  # [batch, max_q_len]
    mask = k_idx[None, None, :] <= q_pos[:, :, None]
    mask &= k_idx[None, None, :] < context_lens[:, None, None]
    pad_rows = q_idx[None, :] >= q_lens[:, None]
    mask[pad_rows] = False
    mask[..., 0] |= pad_rows
    return mask[:, None]


def paged_attention(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    block_tables: torch.Tensor,
    context_lens: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    max_q_len: int,
    max_context_len: int,
    scale: float,
    mask: torch.Tensor | None = None,
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """Attention of each query token over its sequence's paged K/V (mixed prefill + decode).

    Returns [num_tokens, num_heads, head_dim]. `mask` may be passed precomputed (it is the same for
    every layer of a step). With quant_bits 4/8 the gathered blocks are dequantized first.
    """
    num_tokens, num_heads, head_dim = q.shape
    batch = block_tables.shape[0]
    block_size, num_kv_heads = k_cache.shape[1], k_cache.shape[2]
    num_blocks_needed = (max_context_len + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks_needed].reshape(-1).long()
    # gather each sequence's blocks (index_select: no parallel region for small gathers, which
    # matters on a busy 2-core CPU) -> [batch, context, kv_heads, D]
    keys = k_cache.index_select(0, tables).view(batch, -1, num_kv_heads, k_cache.shape[-1])
    values = v_cache.index_select(0, tables).view(batch, -1, num_kv_heads, v_cache.shape[-1])
    if quant_bits:
        keys = _gather_dequantize(keys, k_scales_zeros, tables, quant_bits, q.dtype)
        values = _gather_dequantize(values, v_scales_zeros, tables, quant_bits, q.dtype)
    keys, values = keys[:, :max_context_len], values[:, :max_context_len]
    # slots past a sequence's context hold whatever the cache had (possibly NaN bits): zero them,
    # as the GPU kernels do by never loading them, so masked scores stay exactly zero
    beyond = torch.arange(max_context_len, device=q.device)[None, :] >= context_lens[:, None]
    keys = keys.masked_fill(beyond[:, :, None, None], 0).to(q.dtype)
    values = values.masked_fill(beyond[:, :, None, None], 0).to(q.dtype)
    if max_q_len == 1 and num_tokens == batch:
        return _decode_attention(q, keys, values, beyond, scale)
    keys, values = keys.transpose(1, 2), values.transpose(1, 2)
    q_lens = cu_seqlens_q[1:] - cu_seqlens_q[:-1]
    if mask is None:
        mask = paged_attention_mask(q_lens, context_lens, max_q_len, max_context_len)
    padded_q = q.new_zeros(batch, max_q_len, num_heads, head_dim)
    token_seq = torch.repeat_interleave(torch.arange(batch, device=q.device), q_lens)
    token_pos = torch.arange(num_tokens, device=q.device) - cu_seqlens_q[:-1][token_seq]
    padded_q[token_seq, token_pos] = q
    out = F.scaled_dot_product_attention(
        padded_q.transpose(1, 2),
        keys,
        values,
        attn_mask=mask,
        scale=scale,
        enable_gqa=num_heads != num_kv_heads,
    ).transpose(1, 2)  # [batch, max_q_len, heads, D]
    return out[token_seq, token_pos]


def _gather_dequantize(
    codes: torch.Tensor, scales_zeros: torch.Tensor, tables: torch.Tensor, quant_bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """codes [B, L, KVH, packed] of the gathered blocks -> values [B, L, KVH, head_dim]."""
    batch, length, num_kv_heads = codes.shape[:3]
    gathered = scales_zeros.index_select(0, tables).view(batch, length, num_kv_heads, 2)
    return kv_quant.dequantize(codes, gathered, quant_bits, dtype)


def _decode_attention(
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beyond: torch.Tensor, scale: float
) -> torch.Tensor:
    """One query per sequence, as plain batched matmuls (GQA by grouping query heads per KV
    head): q [B, H, D], keys/values [B, L, KVH, D], beyond [B, L] -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped_q, keys.permute(0, 2, 3, 1)) * scale  # [B, KVH, G, L]
    scores = scores.float().masked_fill(beyond[:, None, None, :], float("-inf"))
    probs = scores.softmax(dim=-1).to(values.dtype)
    out = torch.matmul(probs, values.transpose(1, 2))  # [B, KVH, G, D]
    return out.reshape(batch, num_heads, head_dim)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual). With `residual`, x is first added to it (pre-norm blocks).

    Matches HF: normalize in float32, cast back to the input dtype, then multiply by the weight.
    """
    if residual is not None:
        x = x + residual
    residual_out = x
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype), residual_out


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX-style ("rotate_half") rotary embedding. q [T, H, D], k [T, KVH, D], cos/sin [T, D/2]."""
    cos = cos[:, None, :]
    sin = sin[:, None, :]

    def rotate(x: torch.Tensor) -> torch.Tensor:
        half = x.shape[-1] // 2
        x1, x2 = x[..., :half].float(), x[..., half:].float()
        return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)

    return rotate(q), rotate(k)


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a packed [..., 2 * I] gate|up tensor: silu(gate) * up -> [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
