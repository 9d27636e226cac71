"""Triton kernels against their torch twins (litedeploy/kernels/reference.py).

Runs on CUDA; skipped without it, unless TRITON_INTERPRET=1 runs the same kernels on the CPU
through Triton's interpreter (slow but exact about indexing, handy without a GPU).

Tolerances: attention is checked against the twin evaluated in float32 on the same (rounded)
inputs, by relative error ||out - ref|| / ||ref||: fp16 < 2e-3, bf16 < 1e-2 (the kernels feed the
probabilities to the second matmul in the input dtype, as flash attention does). Norm and RoPE are
checked elementwise at one unit in the last place of the dtype; store_kv and the residual exactly.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_device import bf16_param, triton_test_device

DEVICE = triton_test_device()

from litedeploy.kernels import reference
from litedeploy.kernels import triton_activation as tri_act
from litedeploy.kernels import triton_attention as tri_attn
from litedeploy.kernels import triton_norm_rope as tri_norm_rope
from litedeploy.kernels import triton_store_kv as tri_store

_BF16 = bf16_param(DEVICE)
DTYPES = [_BF16, torch.float16]
MAX_REL_ERR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}
# (head_dim, block_size) pairs; every GQA ratio runs with each
SHAPES = [(64, 16), (128, 64)]


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert not torch.isnan(out).any(), "NaN in kernel output"
    return float((out - ref).norm() / ref.norm())


def _paged_case(
    seqs: list[tuple[int, int]],
    num_heads: int,
    num_kv_heads: int,
    head_dim: int,
    block_size: int,
    dtype: torch.dtype,
) -> dict:
    """Random paged cache holding each sequence's (prefix + new) tokens in shuffled blocks.

    seqs: (cached prefix length, new tokens this step) per sequence.
    """
    context_lens = [prefix + new for prefix, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 3  # spare blocks that no table points to
    block_ids = torch.randperm(num_blocks).tolist()
    max_blocks = max(blocks_per_seq) + 1  # a padded column, read never
    tables = torch.zeros(len(seqs), max_blocks, dtype=torch.int32)
    for row, count in enumerate(blocks_per_seq):
        tables[row, :count] = torch.tensor([block_ids.pop() for _ in range(count)])
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    q_lens = torch.tensor([new for _, new in seqs])
    cu_seqlens_q = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu_seqlens_q[1:] = torch.cumsum(q_lens, 0)
    return {
        "q": torch.randn(int(q_lens.sum()), num_heads, head_dim, dtype=dtype, device=DEVICE),
        "k_cache": torch.randn(cache_shape, dtype=dtype, device=DEVICE),
        "v_cache": torch.randn(cache_shape, dtype=dtype, device=DEVICE),
        "block_tables": tables.to(DEVICE),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32, device=DEVICE),
        "cu_seqlens_q": cu_seqlens_q.to(DEVICE),
        "max_q_len": int(q_lens.max()),
        "max_context_len": max(context_lens),
        "scale": head_dim**-0.5,
    }


def _reference_fp32(case: dict) -> torch.Tensor:
    upcast = {k: v.float() if k in ("q", "k_cache", "v_cache") else v for k, v in case.items()}
    return reference.paged_attention(**upcast)


# contexts at, around and across block boundaries, odd lengths, a one-token context
DECODE_CONTEXTS = [1, 15, 16, 17, 63, 64, 65, 130, 257]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,block_size", SHAPES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_decode_matches_reference(dtype, head_dim, block_size, group) -> None:
    case = _paged_case(
        [(n - 1, 1) for n in DECODE_CONTEXTS], 4 * group, 4, head_dim, block_size, dtype
    )
    out = tri_attn.paged_attention(**case)
    assert out.shape == case["q"].shape and out.dtype == dtype
    assert _rel_err(out, _reference_fp32(case)) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("num_splits", [1, 3, 8])
def test_decode_split_k_any_partition_count(num_splits) -> None:
    # 8 splits of a 300-token max context leave the short sequences with empty partitions
    case = _paged_case([(299, 1), (4, 1), (100, 1)], 8, 2, 64, 16, torch.float16)
    args = {k: v for k, v in case.items() if k != "max_q_len"}
    out = tri_attn.decode_attention(**args, num_splits=num_splits)
    assert _rel_err(out, _reference_fp32(case)) < MAX_REL_ERR[torch.float16]


def test_decode_skips_sequences_without_a_query() -> None:
    case = _paged_case([(20, 1), (33, 0), (7, 1)], 4, 2, 64, 16, torch.float16)
    out = tri_attn.paged_attention(**case)
    assert out.shape[0] == 2
    assert _rel_err(out, _reference_fp32(case)) < MAX_REL_ERR[torch.float16]


# (prefix, new): fresh prompts, chunks after a cached prefix, decode rows mixed in, block edges
MIXED_SEQS = [(0, 37), (50, 1), (64, 64), (15, 20), (0, 1), (100, 1), (3, 70)]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim,block_size", SHAPES)
@pytest.mark.parametrize("group", [1, 2, 4])
def test_prefill_mixed_batch_matches_reference(dtype, head_dim, block_size, group) -> None:
    case = _paged_case(MIXED_SEQS, 2 * group, 2, head_dim, block_size, dtype)
    out = tri_attn.paged_attention(**case)
    assert out.shape == case["q"].shape and out.dtype == dtype
    assert _rel_err(out, _reference_fp32(case)) < MAX_REL_ERR[dtype]


def test_prefill_is_causal_inside_the_chunk() -> None:
    # changing the last new token's K/V must leave every earlier query's output untouched
    case = _paged_case([(10, 30)], 2, 2, 64, 16, torch.float16)
    before = tri_attn.paged_attention(**case)
    last_slot = 39
    block = int(case["block_tables"][0, last_slot // 16])
    case["k_cache"][block, last_slot % 16] += 5.0
    case["v_cache"][block, last_slot % 16] += 5.0
    after = tri_attn.paged_attention(**case)
    torch.testing.assert_close(after[:-1], before[:-1], rtol=0, atol=0)
    assert not torch.equal(after[-1], before[-1])


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("block_size", [16, 64])
def test_store_kv_matches_reference(dtype, block_size) -> None:
    num_tokens, num_kv_heads, head_dim, num_blocks = 37, 4, 128, 6
    # k and v sliced out of one fused projection: strided rows, contiguous head_dim
    qkv = torch.randn(num_tokens, 3 * num_kv_heads, head_dim, dtype=dtype, device=DEVICE)
    k, v = qkv[:, num_kv_heads : 2 * num_kv_heads], qkv[:, 2 * num_kv_heads :]
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[0, 5, 36]] = -1  # padded rows write nothing
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=DEVICE)
    k_ref, v_ref = k_cache.clone(), v_cache.clone()
    tri_store.store_kv(k, v, k_cache, v_cache, slots)
    reference.store_kv(k, v, k_ref, v_ref, slots)
    assert torch.equal(k_cache, k_ref) and torch.equal(v_cache, v_ref)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("shape", [(7, 1000), (2, 5, 2048)])
def test_rms_norm_matches_reference(dtype, shape) -> None:
    x = torch.randn(shape, dtype=dtype, device=DEVICE)
    weight = (1 + 0.1 * torch.randn(shape[-1], device=DEVICE)).to(dtype)
    out, residual = tri_norm_rope.rms_norm(x, weight, 1e-6)
    ref_out, _ = reference.rms_norm(x, weight, 1e-6)
    assert residual is x
    torch.testing.assert_close(out, ref_out)  # dtype defaults: rtol 1.6e-2 bf16, 1e-3 fp16


@pytest.mark.parametrize("dtype", DTYPES)
def test_fused_add_rms_norm_matches_reference(dtype) -> None:
    x = torch.randn(9, 768, dtype=dtype, device=DEVICE)
    residual = 4 * torch.randn(9, 768, dtype=dtype, device=DEVICE)
    weight = torch.rand(768, device=DEVICE).to(dtype)
    residual_copy = residual.clone()
    out, new_residual = tri_norm_rope.rms_norm(x, weight, 1e-5, residual=residual)
    ref_out, ref_residual = reference.rms_norm(x, weight, 1e-5, residual=residual_copy)
    assert torch.equal(new_residual, ref_residual)
    assert torch.equal(residual, residual_copy)  # inputs are not modified
    torch.testing.assert_close(out, ref_out)


@pytest.mark.parametrize("dtype", [*DTYPES, torch.float32])
@pytest.mark.parametrize("shape", [(1, 2 * 8192), (5, 2 * 1000), (2, 3, 2 * 4097)])
def test_silu_and_mul_matches_reference(dtype, shape) -> None:
    x = 3 * torch.randn(shape, dtype=dtype, device=DEVICE)
    out = tri_act.silu_and_mul(x)
    ref = reference.silu_and_mul(x)
    assert out.shape == ref.shape == (*shape[:-1], shape[-1] // 2)
    # two roundings to the dtype (silu, then the product): allow two units in the last place
    eps = torch.finfo(dtype).eps
    torch.testing.assert_close(out, ref, rtol=2 * eps, atol=2 * eps)


def _rope_tables(num_tokens: int, head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    positions = torch.randint(0, 4096, (num_tokens,)).float()
    angles = torch.outer(positions, inv_freq)
    return angles.cos().to(DEVICE), angles.sin().to(DEVICE)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(8, 8, 64), (12, 4, 128), (6, 1, 96)])
def test_rope_matches_reference_in_place(dtype, num_heads, num_kv_heads, head_dim) -> None:
    num_tokens = 13
    # q and k as views of one fused qkv tensor, rotated where they lie
    qkv = torch.randn(
        num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=DEVICE
    )
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v_before = qkv[:, num_heads + num_kv_heads :].clone()
    cos, sin = _rope_tables(num_tokens, head_dim)
    ref_q, ref_k = reference.apply_rope(q.clone(), k.clone(), cos, sin)
    out_q, out_k = tri_norm_rope.apply_rope(q, k, cos, sin)
    assert out_q.data_ptr() == q.data_ptr() and out_k.data_ptr() == k.data_ptr()
    torch.testing.assert_close(q, ref_q)
    torch.testing.assert_close(k, ref_k)
    assert torch.equal(qkv[:, num_heads + num_kv_heads :], v_before)  # v untouched


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("num_heads,num_kv_heads,head_dim", [(16, 8, 128), (6, 1, 96)])
def test_rope_store_kv_equals_rope_then_store(dtype, num_heads, num_kv_heads, head_dim) -> None:
    num_tokens, block_size, num_blocks = 13, 16, 4
    qkv = torch.randn(
        num_tokens, num_heads + 2 * num_kv_heads, head_dim, dtype=dtype, device=DEVICE
    )
    q, k = qkv[:, :num_heads], qkv[:, num_heads : num_heads + num_kv_heads]
    v = qkv[:, num_heads + num_kv_heads :]
    cos, sin = _rope_tables(num_tokens, head_dim)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:num_tokens]
    slots[[2, 12]] = -1  # padded rows: q still rotated, nothing stored
    cache_shape = (num_blocks, block_size, num_kv_heads, head_dim)
    k_cache = torch.randn(cache_shape, dtype=dtype, device=DEVICE)
    v_cache = torch.randn(cache_shape, dtype=dtype, device=DEVICE)
    # the two kernels one after the other, on copies
    q_ref, k_ref, k_cache_ref, v_cache_ref = q.clone(), k.clone(), k_cache.clone(), v_cache.clone()
    tri_norm_rope.apply_rope(q_ref, k_ref, cos, sin)
    tri_store.store_kv(k_ref, v, k_cache_ref, v_cache_ref, slots)
    q_before, k_before, k_cache_before = q.clone(), k.clone(), k_cache.clone()
    tri_store.rope_store_kv(q, k, v, cos, sin, k_cache, v_cache, slots)
    assert torch.equal(q, q_ref)  # q rotated in place, where it lies in qkv
    assert torch.equal(k_cache, k_cache_ref) and torch.equal(v_cache, v_cache_ref)
    assert torch.equal(k, k_before)  # k itself is left as it was
    # and against the torch twins (one unit in the last place, as the RoPE test)
    twin_q, twin_k = reference.apply_rope(q_before, k_before, cos, sin)
    twin_k_cache = k_cache_before.clone()
    reference.store_kv(twin_k, v, twin_k_cache, v_cache.clone(), slots)
    torch.testing.assert_close(q, twin_q)
    torch.testing.assert_close(k_cache, twin_k_cache)


@pytest.mark.skipif(DEVICE != "cuda", reason="libdevice pow/cos/sin are not interpreted")
@pytest.mark.parametrize("scaling", [None, "dynamic"])
def test_rope_cos_sin_matches_torch_path(scaling) -> None:
    from litedeploy.config import RopeConfig
    from litedeploy.layers.rotary import RotaryEmbedding

    rope = RopeConfig(theta=1e6, scaling_type=scaling, factor=2.0 if scaling else 1.0)
    rotary = RotaryEmbedding(rope, 128, 256).to(DEVICE)
    positions = torch.randint(0, 1000, (37,), device=DEVICE)
    # dynamic NTK: lengths under the trained window (neutral) and past it (a larger base)
    rope_lens = positions + torch.randint(1, 600, (37,), device=DEVICE)
    cos, sin = rotary(positions, rope_lens if scaling else None)
    inv_freq = (rotary._dynamic_inv_freq(rope_lens) if scaling
                else rotary.inv_freq.to(DEVICE)[None, :])
    freqs = positions.float()[:, None] * inv_freq  # the torch code of RotaryEmbedding.forward
    assert cos.shape == sin.shape == (37, 64) and cos.dtype == torch.float32
    # the same function: within a few float32 units of the largest angle (an inv_freq one unit
    # apart moves an angle of 1000 by ~6e-5)
    atol = 8 * torch.finfo(torch.float32).eps * float(freqs.abs().max())
    torch.testing.assert_close(cos, freqs.cos(), rtol=0, atol=atol)
    torch.testing.assert_close(sin, freqs.sin(), rtol=0, atol=atol)
