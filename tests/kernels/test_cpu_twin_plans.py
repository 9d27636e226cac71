"""The CPU twin's per-step plans (kernels/reference.py): store and attention host work done once
per step, blocks read in place when consecutive, RoPE in one pass over q and k heads.

Data movement only, so the planned paths must give the very same bits as the straightforward
ones: a gather of the same blocks, an index copy of the same slots, the rotate-half formula.
Attention itself is checked against dense float64 attention per sequence.
"""

from __future__ import annotations

import pytest
import torch

from litedeploy.kernels import reference


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    x1, x2 = x[..., :half].float(), x[..., half:].float()
    cos, sin = cos[:, None], sin[:, None]
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("num_tokens", [1, 5])
def test_one_pass_rope_has_the_bits_of_rotate_half(dtype, num_tokens) -> None:
    qkv = torch.randn(num_tokens, (6 + 2 * 2) * 16, dtype=dtype)  # views of a packed q|k|v
    q, k = qkv[:, :96].view(num_tokens, 6, 16), qkv[:, 96:128].view(num_tokens, 2, 16)
    angles = torch.rand(num_tokens, 8) * 50
    out_q, out_k = reference.apply_rope(q, k, angles.cos(), angles.sin())
    assert torch.equal(out_q, _rotate_half(q, angles.cos(), angles.sin()))
    assert torch.equal(out_k, _rotate_half(k, angles.cos(), angles.sin()))


def _cache(num_blocks: int, block_size: int = 4, kv_heads: int = 2, head_dim: int = 8):
    return torch.randn(num_blocks, block_size, kv_heads, head_dim)


def test_consecutive_slots_are_one_slice_copy_with_the_bits_of_index_copy() -> None:
    k, v = torch.randn(6, 2, 8), torch.randn(6, 2, 8)
    slots = torch.arange(9, 15)
    plan = reference.plan_store(slots)
    assert plan.first_slot == 9 and plan.rows is None
    planned = [_cache(5), _cache(5)]
    indexed = [c.clone() for c in planned]
    reference.store_kv_planned(k, v, *planned, plan)
    for cache, new in zip(indexed, (k, v), strict=True):
        cache.view(-1, 2, 8).index_copy_(0, slots, new)
    assert all(torch.equal(a, b) for a, b in zip(planned, indexed, strict=True))


def test_padded_rows_write_nothing_and_scattered_slots_index_copy() -> None:
    k, v = torch.randn(4, 2, 8), torch.randn(4, 2, 8)
    slots = torch.tensor([3, -1, 17, 8])
    plan = reference.plan_store(slots)
    assert plan.first_slot is None and plan.rows.tolist() == [0, 2, 3]
    k_cache, v_cache = _cache(5), _cache(5)
    before = k_cache.clone()
    reference.store_kv(k, v, k_cache, v_cache, slots)
    flat, flat_before = k_cache.view(-1, 2, 8), before.view(-1, 2, 8)
    assert torch.equal(flat[[3, 17, 8]], k[[0, 2, 3]])
    untouched = [s for s in range(20) if s not in (3, 17, 8)]
    assert torch.equal(flat[untouched], flat_before[untouched])


def _dense_attention(q, keys, values, scale):
    """float64 causal attention of q [Q, H, D] (the last Q positions) over keys [L, KVH, D]."""
    q_len, num_heads, _ = q.shape
    length, kv_heads = keys.shape[:2]
    keys = keys.double().repeat_interleave(num_heads // kv_heads, dim=1)
    values = values.double().repeat_interleave(num_heads // kv_heads, dim=1)
    scores = torch.einsum("qhd,lhd->hql", q.double(), keys) * scale
    query_pos = torch.arange(length - q_len, length)[:, None]
    scores = scores.masked_fill(torch.arange(length)[None, :] > query_pos, float("-inf"))
    return torch.einsum("hql,lhd->qhd", scores.softmax(-1), values)


@pytest.mark.parametrize("consecutive", [True, False], ids=["in-place", "gathered"])
def test_mixed_step_matches_dense_attention_and_reads_in_place(consecutive) -> None:
    block_size, heads, kv_heads, dim = 4, 4, 2, 8
    # (context, new tokens): decode rows of far apart lengths, a chunk with a cached prefix,
    # a fresh prompt
    seqs = [(9, 1), (2, 1), (14, 5), (7, 7), (30, 1)]
    counts = [-(-ctx // block_size) for ctx, _ in seqs]
    ids = list(range(sum(counts)))
    if not consecutive:  # descending: no row of several blocks has them in order
        ids.reverse()
    k_cache, v_cache = _cache(sum(counts) + 1), _cache(sum(counts) + 1)
    tables = torch.zeros(len(seqs), max(counts) + 1, dtype=torch.int32)
    for row, count in enumerate(counts):
        tables[row, :count] = torch.tensor([ids.pop(0) for _ in range(count)])
    q_lens = [new for _, new in seqs]
    cu = torch.tensor([0] + torch.tensor(q_lens).cumsum(0).tolist())
    q = torch.randn(sum(q_lens), heads, dim)
    context_lens = torch.tensor([ctx for ctx, _ in seqs])
    plan = reference.plan_attention(tables, context_lens, cu, block_size)
    # a lone row's blocks are read in place when consecutive (one block always is)
    lone = [g.blocks for g in plan.decode_groups if g.blocks.num_rows == 1]
    lone += [c.blocks for c in plan.prefill_chunks]
    assert len(lone) == 5 and all(
        (b.first_block is not None) == (consecutive or b.tables.numel() == 1) for b in lone)
    cache_before = k_cache.clone(), v_cache.clone()
    out = reference.paged_attention_planned(q, k_cache, v_cache, plan, dim**-0.5)
    # the plan serves every layer: a second use gives the same bits and leaves the cache alone
    assert torch.equal(out, reference.paged_attention_planned(q, k_cache, v_cache, plan,
                                                              dim**-0.5))
    assert torch.equal(k_cache, cache_before[0]) and torch.equal(v_cache, cache_before[1])
    for row, (ctx, new) in enumerate(seqs):
        slots = [int(tables[row, t // block_size]) * block_size + t % block_size
                 for t in range(ctx)]
        keys = k_cache.view(-1, kv_heads, dim)[slots]
        values = v_cache.view(-1, kv_heads, dim)[slots]
        start = int(cu[row])
        expected = _dense_attention(q[start:start + new], keys, values, dim**-0.5)
        torch.testing.assert_close(out[start:start + new].double(), expected, rtol=1e-5,
                                   atol=1e-5)
