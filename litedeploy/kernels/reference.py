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

import itertools

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
    k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None,
    quant_bits: int = 0,
) -> torch.Tensor:
    """Attention of each query token over its sequence's paged K/V (mixed prefill + decode).

    Returns [num_tokens, num_heads, head_dim]. Variable-length: decode rows (one query each) attend
    together over their own longest context, and each prefill chunk alone over its own blocks, so
    a step costs what its real tokens cost; padding every row to the step's longest query and
    context made one long prompt beside many decoding streams cost them all its length squared.
    With quant_bits 4/8 the gathered blocks are dequantized first.
    """
    quant = (k_scales_zeros, v_scales_zeros, quant_bits)
    q_starts = cu_seqlens_q.tolist()  # host lists: a few ints per sequence, once per layer
    context_list = context_lens.tolist()
    q_lens = [end - start for start, end in itertools.pairwise(q_starts)]
    decode_rows = [row for row, q_len in enumerate(q_lens) if q_len == 1]
    buckets = _length_buckets(decode_rows, context_list, k_cache.shape[1])
    if len(buckets) == 1 and len(decode_rows) == len(q_lens):  # a plain decode step
        return _decode_rows(q, k_cache, v_cache, block_tables, context_lens, max_context_len,
                            scale, quant)
    out = torch.empty_like(q)
    for rows in buckets:
        index = torch.tensor(rows, device=q.device)
        token_index = torch.tensor([q_starts[row] for row in rows], device=q.device)
        out[token_index] = _decode_rows(
            q[token_index], k_cache, v_cache, block_tables[index], context_lens[index],
            max(context_list[row] for row in rows), scale, quant)
    for row, q_len in enumerate(q_lens):
        if q_len > 1:
            start = q_starts[row]
            out[start:start + q_len] = _prefill_row(
                q[start:start + q_len], k_cache, v_cache, block_tables[row],
                context_list[row], scale, quant)
    return out


def _length_buckets(rows: list[int], context_lens: list[int], block_size: int) -> list[list[int]]:
    """Decode rows grouped by the power of two above their block count: each group is padded
    to its own longest context, so no row reads more than twice the blocks it needs (one long
    context beside many short ones padded them all to its length)."""
    buckets: dict[int, list[int]] = {}
    for row in rows:
        num_blocks = -(-context_lens[row] // block_size)
        buckets.setdefault((num_blocks - 1).bit_length(), []).append(row)
    return list(buckets.values())


def _gather_blocks(
    cache: torch.Tensor, scales_zeros: torch.Tensor | None, tables: torch.Tensor, rows: int,
    quant_bits: int, dtype: torch.dtype,
) -> torch.Tensor:
    """The blocks named in `tables` (flat, `rows` sequences' worth) -> [rows, L, KVH, head_dim]."""
    # index_select: no parallel region for small gathers, which matters on a busy 2-core CPU
    gathered = cache.index_select(0, tables).view(rows, -1, *cache.shape[2:])
    if quant_bits:
        gathered = _gather_dequantize(gathered, scales_zeros, tables, quant_bits, dtype)
    return gathered


def _decode_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_tables: torch.Tensor,
    context_lens: torch.Tensor, max_context_len: int, scale: float, quant: tuple,
) -> torch.Tensor:
    """One query per row over its sequence's blocks, padded to the rows' longest context."""
    k_scales_zeros, v_scales_zeros, quant_bits = quant
    batch, block_size = block_tables.shape[0], k_cache.shape[1]
    num_blocks_needed = (max_context_len + block_size - 1) // block_size
    tables = block_tables[:, :num_blocks_needed].reshape(-1).long()
    keys = _gather_blocks(k_cache, k_scales_zeros, tables, batch, quant_bits, q.dtype)
    values = _gather_blocks(v_cache, v_scales_zeros, tables, batch, quant_bits, q.dtype)
    keys, values = keys[:, :max_context_len].to(q.dtype), values[:, :max_context_len].to(q.dtype)
    # slots past a sequence's context hold whatever the cache had (possibly NaN bits): their
    # scores are masked to -inf, and their values zeroed (in place: the gather is a fresh copy),
    # as the GPU kernels do by never loading them, so 0 * garbage cannot turn into NaN
    beyond = torch.arange(max_context_len, device=q.device)[None, :] >= context_lens[:, None]
    values.masked_fill_(beyond[:, :, None, None], 0)
    return _decode_attention(q, keys, values, beyond, scale)


def _prefill_row(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, block_table: torch.Tensor,
    context_len: int, scale: float, quant: tuple,
) -> torch.Tensor:
    """A chunk of q_len queries, the last q_len positions of a context of `context_len` keys
    (its cached prefix, then itself), causally: q [q_len, H, D] -> [q_len, H, D]."""
    k_scales_zeros, v_scales_zeros, quant_bits = quant
    q_len, num_heads = q.shape[:2]
    block_size = k_cache.shape[1]
    tables = block_table[:(context_len + block_size - 1) // block_size].long()
    keys = _gather_blocks(k_cache, k_scales_zeros, tables, 1, quant_bits, q.dtype)
    values = _gather_blocks(v_cache, v_scales_zeros, tables, 1, quant_bits, q.dtype)
    keys = keys[:, :context_len].to(q.dtype).transpose(1, 2)  # [1, KVH, L, D]
    values = values[:, :context_len].to(q.dtype).transpose(1, 2)
    if q_len == context_len:  # no cached prefix: plain causal
        mask, is_causal = None, True
    else:  # query i sits at position context_len - q_len + i and sees every key up to it
        key_idx = torch.arange(context_len, device=q.device)
        query_pos = torch.arange(context_len - q_len, context_len, device=q.device)
        mask, is_causal = key_idx[None, :] <= query_pos[:, None], False
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=mask, is_causal=is_causal, scale=scale,
        enable_gqa=num_heads != keys.shape[1],
    )  # [1, H, q_len, D]
    return out[0].transpose(0, 1)


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
