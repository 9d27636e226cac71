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
from dataclasses import dataclass

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
    store_kv_planned(k, v, k_cache, v_cache, plan_store(slot_mapping), k_scales_zeros,
                     v_scales_zeros, quant_bits)


@dataclass(frozen=True)
class StorePlan:
    """Where a step's K/V rows go, worked out once per step (every layer stores alike):
    `first_slot` when the rows fill consecutive slots (a decode row, a prefill chunk within a
    block or over consecutive blocks): a plain slice copy; else `rows` (None: all) and `slots`
    for an index copy."""

    first_slot: int | None
    rows: torch.Tensor | None
    slots: torch.Tensor


def plan_store(slot_mapping: torch.Tensor) -> StorePlan:
    slots = slot_mapping.tolist()  # host ints: a CPU tensor (this is the CPU twin)
    if slots and slots[0] >= 0 and slots[-1] - slots[0] == len(slots) - 1 and all(
            b - a == 1 for a, b in itertools.pairwise(slots)):
        return StorePlan(slots[0], None, slot_mapping)
    if all(slot >= 0 for slot in slots):
        return StorePlan(None, None, slot_mapping)
    rows = [row for row, slot in enumerate(slots) if slot >= 0]  # padded rows write nothing
    return StorePlan(None, torch.tensor(rows, dtype=torch.long, device=slot_mapping.device),
                     slot_mapping[slot_mapping >= 0])


def store_kv_planned(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    plan: StorePlan, k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None, quant_bits: int = 0,
) -> None:
    if plan.rows is not None:
        k, v = k.index_select(0, plan.rows), v.index_select(0, plan.rows)
    if quant_bits:
        k, k_sz = kv_quant.quantize(k, quant_bits)
        v, v_sz = kv_quant.quantize(v, quant_bits)
        _write_slots(k_scales_zeros, k_sz, plan)
        _write_slots(v_scales_zeros, v_sz, plan)
    _write_slots(k_cache, k, plan)
    _write_slots(v_cache, v, plan)


def _write_slots(cache: torch.Tensor, rows: torch.Tensor, plan: StorePlan) -> None:
    flat = cache.view(-1, *cache.shape[2:])  # [num_blocks * block_size, ...]
    if plan.first_slot is not None:
        flat[plan.first_slot:plan.first_slot + rows.shape[0]].copy_(rows)  # casts as it copies
    else:
        flat.index_copy_(0, plan.slots, rows.to(flat.dtype))


@dataclass(frozen=True)
class _Blocks:
    """Where some rows' K/V blocks are: `tables` flat block ids ([rows * blocks] int64) for a
    gather, or `first_block` when there is one row whose blocks are consecutive in the cache:
    then they are read in place, as a view (a single chat's blocks usually are)."""

    tables: torch.Tensor
    num_rows: int
    first_block: int | None


@dataclass(frozen=True)
class _DecodeGroup:
    token_index: torch.Tensor | None  # the group's query tokens; None: every token, in order
    blocks: _Blocks
    context_len: int  # the group's longest context
    beyond: torch.Tensor | None  # [rows, context_len] slots past a row's context; None: none


@dataclass(frozen=True)
class _PrefillChunk:
    start: int
    q_len: int
    context_len: int
    blocks: _Blocks
    mask: torch.Tensor | None  # [q_len, context_len]; None: plain causal (no cached prefix)


@dataclass(frozen=True)
class AttentionPlan:
    """The host work of `paged_attention` (bucketing, block ids, masks), which every layer of a
    step shares: built once per step, it leaves each layer only its tensor math."""

    decode_groups: list[_DecodeGroup]
    prefill_chunks: list[_PrefillChunk]


def plan_attention(
    block_tables: torch.Tensor, context_lens: torch.Tensor, cu_seqlens_q: torch.Tensor,
    block_size: int,
) -> AttentionPlan:
    q_starts = cu_seqlens_q.tolist()  # host lists: a few ints per sequence, once per step
    context_list = context_lens.tolist()
    q_lens = [end - start for start, end in itertools.pairwise(q_starts)]
    decode_rows = [row for row, q_len in enumerate(q_lens) if q_len == 1]
    buckets = _length_buckets(decode_rows, context_list, block_size)
    device = block_tables.device
    if len(buckets) == 1 and len(decode_rows) == len(q_lens):  # a plain decode step
        rows = list(range(len(q_lens)))
        return AttentionPlan([_decode_group(None, rows, block_tables, context_list,
                                            block_size)], [])
    groups = [_decode_group(torch.tensor([q_starts[row] for row in rows], device=device), rows,
                            block_tables, context_list, block_size) for rows in buckets]
    chunks = [_prefill_chunk(q_starts[row], q_len, context_list[row], block_tables[row],
                             block_size)
              for row, q_len in enumerate(q_lens) if q_len > 1]
    return AttentionPlan(groups, chunks)


def _blocks(block_tables: torch.Tensor, num_blocks: int) -> _Blocks:
    """block_tables [rows, max_blocks] -> the first num_blocks of each row."""
    tables = block_tables[:, :num_blocks].reshape(-1).long()
    first_block = None
    if block_tables.shape[0] == 1:
        ids = tables.tolist()
        if ids[-1] - ids[0] == len(ids) - 1 and all(b - a == 1 for a, b in itertools.pairwise(ids)):
            first_block = ids[0]
    return _Blocks(tables, block_tables.shape[0], first_block)


def _decode_group(token_index: torch.Tensor | None, rows: list[int], block_tables: torch.Tensor,
                  context_list: list[int], block_size: int) -> _DecodeGroup:
    lens = [context_list[row] for row in rows]
    context_len = max(lens)
    if token_index is not None:
        block_tables = block_tables[torch.tensor(rows, device=block_tables.device)]
    blocks = _blocks(block_tables, -(-context_len // block_size))
    beyond = None
    if min(lens) < context_len:  # some rows are padded to the longest: mask their tail
        row_lens = torch.tensor(lens, device=block_tables.device)
        beyond = torch.arange(context_len, device=block_tables.device)[None, :] >= row_lens[:, None]
    return _DecodeGroup(token_index, blocks, context_len, beyond)


def _prefill_chunk(start: int, q_len: int, context_len: int, block_table: torch.Tensor,
                   block_size: int) -> _PrefillChunk:
    blocks = _blocks(block_table[None], -(-context_len // block_size))
    mask = None
    if q_len != context_len:  # query i sits at position context_len - q_len + i, sees keys <= it
        key_idx = torch.arange(context_len, device=block_table.device)
        query_pos = torch.arange(context_len - q_len, context_len, device=block_table.device)
        mask = key_idx[None, :] <= query_pos[:, None]
    return _PrefillChunk(start, q_len, context_len, blocks, mask)


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
    plan = plan_attention(block_tables, context_lens, cu_seqlens_q, k_cache.shape[1])
    return paged_attention_planned(q, k_cache, v_cache, plan, scale, k_scales_zeros,
                                   v_scales_zeros, quant_bits)


def paged_attention_planned(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, plan: AttentionPlan,
    scale: float, k_scales_zeros: torch.Tensor | None = None,
    v_scales_zeros: torch.Tensor | None = None, quant_bits: int = 0,
) -> torch.Tensor:
    """`paged_attention` with its host work done (`plan_attention`, once per step)."""
    quant = (k_scales_zeros, v_scales_zeros, quant_bits)
    if not plan.prefill_chunks and plan.decode_groups[0].token_index is None:
        return _decode_rows(q, k_cache, v_cache, plan.decode_groups[0], scale, quant)
    out = torch.empty_like(q)
    for group in plan.decode_groups:
        out[group.token_index] = _decode_rows(q[group.token_index], k_cache, v_cache, group,
                                              scale, quant)
    for chunk in plan.prefill_chunks:
        out[chunk.start:chunk.start + chunk.q_len] = _prefill_rows(
            q[chunk.start:chunk.start + chunk.q_len], k_cache, v_cache, chunk, scale, quant)
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


def _read_blocks(
    cache: torch.Tensor, scales_zeros: torch.Tensor | None, blocks: _Blocks, quant_bits: int,
    dtype: torch.dtype,
) -> torch.Tensor:
    """The blocks' slots, [rows, L, KVH, head_dim]: a view of the cache when they are
    consecutive (never write to it), else a gathered copy."""
    if blocks.first_block is not None:
        first, count = blocks.first_block, blocks.tables.shape[0]
        read = cache[first:first + count].view(1, -1, *cache.shape[2:])
        if quant_bits:
            sz = scales_zeros[first:first + count].view(*read.shape[:3], 2)
            read = kv_quant.dequantize(read, sz, quant_bits, dtype)
        return read
    # index_select: no parallel region for small gathers, which matters on a busy 2-core CPU
    gathered = cache.index_select(0, blocks.tables).view(blocks.num_rows, -1, *cache.shape[2:])
    if quant_bits:
        gathered = _gather_dequantize(gathered, scales_zeros, blocks.tables, quant_bits, dtype)
    return gathered


def _decode_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, group: _DecodeGroup,
    scale: float, quant: tuple,
) -> torch.Tensor:
    """One query per row over its sequence's blocks, padded to the rows' longest context."""
    k_scales_zeros, v_scales_zeros, quant_bits = quant
    length = group.context_len
    keys = _read_blocks(k_cache, k_scales_zeros, group.blocks, quant_bits, q.dtype)
    values = _read_blocks(v_cache, v_scales_zeros, group.blocks, quant_bits, q.dtype)
    keys, values = keys[:, :length].to(q.dtype), values[:, :length].to(q.dtype)
    if group.beyond is not None:
        # slots past a row's context hold whatever the cache had (possibly NaN bits): their
        # scores are masked to -inf, and their values zeroed (in place: padded groups have
        # several rows, so this is a gathered copy), as the GPU kernels do by never loading
        # them, so 0 * garbage cannot turn into NaN
        values.masked_fill_(group.beyond[:, :, None, None], 0)
    return _decode_attention(q, keys, values, group.beyond, scale)


def _prefill_rows(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, chunk: _PrefillChunk,
    scale: float, quant: tuple,
) -> torch.Tensor:
    """A chunk of q_len queries, the last q_len positions of a context of `context_len` keys
    (its cached prefix, then itself), causally: q [q_len, H, D] -> [q_len, H, D]."""
    k_scales_zeros, v_scales_zeros, quant_bits = quant
    num_heads, length = q.shape[1], chunk.context_len
    keys = _read_blocks(k_cache, k_scales_zeros, chunk.blocks, quant_bits, q.dtype)
    values = _read_blocks(v_cache, v_scales_zeros, chunk.blocks, quant_bits, q.dtype)
    keys = keys[:, :length].to(q.dtype).transpose(1, 2)  # [1, KVH, L, D]
    values = values[:, :length].to(q.dtype).transpose(1, 2)
    out = F.scaled_dot_product_attention(
        q.transpose(0, 1)[None], keys, values, attn_mask=chunk.mask,
        is_causal=chunk.mask is None, scale=scale, enable_gqa=num_heads != keys.shape[1],
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
    q: torch.Tensor, keys: torch.Tensor, values: torch.Tensor, beyond: torch.Tensor | None,
    scale: float,
) -> torch.Tensor:
    """One query per sequence, as plain batched matmuls (GQA by grouping query heads per KV
    head): q [B, H, D], keys/values [B, L, KVH, D], beyond [B, L] -> [B, H, D]."""
    batch, num_heads, head_dim = q.shape
    num_kv_heads = keys.shape[2]
    grouped_q = q.view(batch, num_kv_heads, num_heads // num_kv_heads, head_dim)
    scores = torch.matmul(grouped_q, keys.permute(0, 2, 3, 1)) * scale  # [B, KVH, G, L]
    scores = scores.float()
    if beyond is not None:
        scores = scores.masked_fill(beyond[:, None, None, :], float("-inf"))
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
    """NeoX-style ("rotate_half") rotary embedding. q [T, H, D], k [T, KVH, D], cos/sin [T, D/2].

    One pass over q and k heads together, each head seen as its two halves [T, heads, 2, D/2]:
    out = x * cos + swap_halves(x) * (-sin, sin), the same float32 products and sums (so the
    same bits) as x1 * cos - x2 * sin | x2 * cos + x1 * sin, in ~10 ops instead of ~22."""
    num_tokens, num_heads, head_dim = q.shape
    heads = torch.cat((q, k), dim=1).float().view(num_tokens, -1, 2, head_dim // 2)
    signed_sin = torch.stack((-sin, sin), dim=1)[:, None]  # [T, 1, 2, D/2]
    rotated = heads * cos[:, None, None] + heads.flip(2) * signed_sin
    rotated = rotated.to(q.dtype).view(num_tokens, -1, head_dim)
    return rotated[:, :num_heads], rotated[:, num_heads:]


def silu_and_mul(x: torch.Tensor) -> torch.Tensor:
    """SwiGLU's activation on a packed [..., 2 * I] gate|up tensor: silu(gate) * up -> [..., I]."""
    gate, up = x.chunk(2, dim=-1)
    return torch.nn.functional.silu(gate) * up
