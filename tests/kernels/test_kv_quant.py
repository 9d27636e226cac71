"""KV cache quantization (--quant-policy 8 / 4): the twin's quantizer, store and attention.

Bounds: every dequantized element is within scale / 2 of its input (plus float32 rounding);
attention over a quantized cache vs the float cache on the same random data, by relative error
||out - ref|| / ||ref||: int8 < 1e-2, int4 < 1.5e-1 (random Gaussian K/V is the worst case for
per-token min/max ranges). Attention over the quantized cache also equals float attention over
the dequantized K/V to float32 rounding, which pins the gather/dequant wiring exactly.
On CUDA the Triton quantized store and attention are checked against the twin.
"""

from __future__ import annotations

import pytest
import torch

from litedeploy import kernels
from litedeploy.kernels import kv_quant, reference

MAX_REL_ERR = {8: 1e-2, 4: 1.5e-1}
DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


@pytest.fixture(autouse=True)
def _seed() -> None:
    torch.manual_seed(0)


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any()
    return float((out.double() - ref.double()).norm() / ref.double().norm())


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_round_trip_error_is_at_most_half_a_step(bits, dtype) -> None:
    x = (torch.randn(33, 4, 64) * torch.rand(33, 4, 1) * 10 + torch.randn(33, 4, 1)).to(dtype)
    codes, scales_zeros = kv_quant.quantize(x, bits)
    assert codes.dtype == torch.uint8 and codes.shape[-1] == 64 * bits // 8
    assert scales_zeros.shape == (33, 4, 2) and scales_zeros.dtype == torch.float32
    back = kv_quant.dequantize(codes, scales_zeros, bits, torch.float32)
    err = (back - x.float()).abs()
    step = scales_zeros[..., :1]
    assert bool((err <= step / 2 * (1 + 1e-4) + 1e-6).all())
    # the extremes are exact: zero is the min, and the max is code 2^bits - 1
    assert torch.allclose(back.amin(-1), x.float().amin(-1), atol=1e-5)
    assert torch.allclose(back.amax(-1), x.float().amax(-1), rtol=1e-5, atol=1e-5)


def test_int4_packing_is_two_nibbles_per_byte_low_first() -> None:
    x = torch.arange(16, dtype=torch.float32).repeat(2, 1)  # codes 0..15 with scale 1, zero 0
    codes, scales_zeros = kv_quant.quantize(x, 4)
    assert torch.equal(scales_zeros[0], torch.tensor([1.0, 0.0]))
    expected = [lo | (hi << 4) for lo, hi in zip(range(0, 16, 2), range(1, 16, 2), strict=True)]
    assert codes[0].tolist() == expected


@pytest.mark.parametrize("bits", [8, 4])
def test_constant_vector_dequantizes_exactly(bits) -> None:
    x = torch.full((3, 2, 8), -2.5)
    codes, scales_zeros = kv_quant.quantize(x, bits)
    assert torch.equal(kv_quant.dequantize(codes, scales_zeros, bits, torch.float32), x)


def _case(seqs, num_heads, num_kv_heads, head_dim, block_size, dtype, device, pad_rows=0):
    """Random K/V of every sequence's context written by store_kv through shuffled blocks.

    seqs: (cached prefix, new tokens) per sequence. Returns the inputs of paged_attention for
    this step's queries, with the whole context (prefix + new) stored, plus `pad_rows` slot -1
    rows in the store.
    """
    context_lens = [prefix + new for prefix, new in seqs]
    blocks_per_seq = [-(-n // block_size) for n in context_lens]
    num_blocks = sum(blocks_per_seq) + 2
    ids = torch.randperm(num_blocks).tolist()
    tables = torch.zeros(len(seqs), max(blocks_per_seq) + 1, dtype=torch.int32)
    slots = []
    for row, (count, ctx) in enumerate(zip(blocks_per_seq, context_lens, strict=True)):
        tables[row, :count] = torch.tensor([ids.pop() for _ in range(count)])
        slots += [int(tables[row, t // block_size]) * block_size + t % block_size
                  for t in range(ctx)]
    slots += [-1] * pad_rows
    q_lens = torch.tensor([new for _, new in seqs])
    cu = torch.zeros(len(seqs) + 1, dtype=torch.int32)
    cu[1:] = torch.cumsum(q_lens, 0)
    total = len(slots)
    return {
        "q": torch.randn(int(q_lens.sum()), num_heads, head_dim, dtype=dtype, device=device),
        "k": torch.randn(total, num_kv_heads, head_dim, dtype=dtype, device=device),
        "v": torch.randn(total, num_kv_heads, head_dim, dtype=dtype, device=device),
        "slots": torch.tensor(slots, dtype=torch.int64, device=device),
        "tables": tables.to(device),
        "context_lens": torch.tensor(context_lens, dtype=torch.int32, device=device),
        "cu": cu.to(device), "max_q_len": int(q_lens.max()), "max_ctx": max(context_lens),
        "cache_shape": (num_blocks, block_size, num_kv_heads, head_dim),
    }


def _attend(case, bits, store, attention):
    """Store the case's K/V in a fresh cache (float when bits == 0) and attend; caches are
    filled with NaN first so that any read of an unwritten slot shows."""
    nb, bs, kvh, dim = case["cache_shape"]
    dev, dtype = case["q"].device, case["q"].dtype
    if bits:
        k_cache = torch.full((nb, bs, kvh, kv_quant.packed_head_dim(dim, bits)), 255,
                             dtype=torch.uint8, device=dev)
        v_cache = k_cache.clone()
        k_sz = torch.full((nb, bs, kvh, 2), float("nan"), device=dev)
        v_sz = k_sz.clone()
        quant = (k_sz, v_sz, bits)
    else:
        k_cache = torch.full(case["cache_shape"], float("nan"), dtype=dtype, device=dev)
        v_cache = k_cache.clone()
        quant = ()
    store(case["k"], case["v"], k_cache, v_cache, case["slots"], *quant)
    out = attention(case["q"], k_cache, v_cache, case["tables"], case["context_lens"],
                    case["cu"], case["max_q_len"], case["max_ctx"], case["q"].shape[-1] ** -0.5,
                    *quant)
    return out, (k_cache, v_cache, *quant)


# (prefix, new) per sequence: mixed prefill + decode, block boundaries (block_size 4) on both sides
MIXED = [(0, 9), (7, 1), (3, 5), (12, 4), (4, 1)]
DECODE = [(8, 1), (0, 1), (15, 1), (4, 1)]


@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seqs", [MIXED, DECODE], ids=["mixed", "decode"])
@pytest.mark.parametrize("group", [1, 4])
def test_quantized_attention_close_to_float(bits, seqs, group) -> None:
    case = _case(seqs, 2 * group, 2, 32, 4, torch.float32, "cpu", pad_rows=3)
    ref, _ = _attend(case, 0, reference.store_kv, reference.paged_attention)
    out, _ = _attend(case, bits, reference.store_kv, reference.paged_attention)
    assert _rel_err(out, ref) < MAX_REL_ERR[bits]
    # the same attention over the dequantized K/V: equal to float32 rounding
    exact = dict(case)
    for name in ("k", "v"):
        codes, scales_zeros = kv_quant.quantize(case[name], bits)
        exact[name] = kv_quant.dequantize(codes, scales_zeros, bits, torch.float32)
    dequantized_ref, _ = _attend(exact, 0, reference.store_kv, reference.paged_attention)
    assert _rel_err(out, dequantized_ref) < 1e-6


@pytest.mark.parametrize("bits", [8, 4])
def test_padding_rows_write_nothing(bits) -> None:
    case = _case([(0, 5)], 4, 2, 16, 4, torch.float32, "cpu", pad_rows=4)
    _, (k_cache, v_cache, k_sz, v_sz, _) = _attend(
        case, bits, reference.store_kv, reference.paged_attention)
    written = torch.zeros(k_sz.shape[0] * k_sz.shape[1], dtype=torch.bool)
    written[case["slots"][case["slots"] >= 0]] = True
    for cache, scales_zeros in ((k_cache, k_sz), (v_cache, v_sz)):
        flat_sz = scales_zeros.view(-1, *scales_zeros.shape[2:])
        assert not torch.isnan(flat_sz[written]).any()
        assert torch.isnan(flat_sz[~written]).all()  # nothing else touched, padding included
        assert bool((cache.view(-1, *cache.shape[2:])[~written] == 255).all())


def test_dispatch_leaves_the_float_path_alone() -> None:
    case = _case(MIXED, 4, 2, 16, 4, torch.float32, "cpu")
    out, _ = _attend(case, 0, kernels.store_kv, kernels.paged_attention)
    ref, _ = _attend(case, 0, reference.store_kv, reference.paged_attention)
    assert torch.equal(out, ref)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="Triton quantized kernels need CUDA")
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("seqs", [MIXED, DECODE, [(100, 1), (300, 1), (3, 1)],
                                  [(70, 60), (0, 130)]], ids=["mixed", "decode", "long", "chunks"])
@pytest.mark.parametrize("group,head_dim,block_size", [(1, 64, 16), (4, 128, 64), (2, 32, 4)])
def test_triton_quantized_matches_twin(bits, seqs, group, head_dim, block_size) -> None:
    case = _case(seqs, 2 * group, 2, head_dim, block_size, torch.bfloat16, "cuda", pad_rows=2)
    out, caches = _attend(case, bits, kernels.store_kv, kernels.paged_attention)
    k_cache, k_sz = caches[0], caches[2]
    ref, (ref_k_cache, _, ref_k_sz, _, _) = _attend(
        case, bits, reference.store_kv, reference.paged_attention)
    written = case["slots"][case["slots"] >= 0]
    assert torch.allclose(k_sz.view(-1, 2, 2)[written], ref_k_sz.view(-1, 2, 2)[written],
                          rtol=1e-5, atol=1e-6)
    values = kv_quant.dequantize(k_cache.view(-1, *k_cache.shape[2:])[written],
                                 k_sz.view(-1, 2, 2)[written], bits, torch.float32)
    ref_values = kv_quant.dequantize(ref_k_cache.view(-1, *k_cache.shape[2:])[written],
                                     ref_k_sz.view(-1, 2, 2)[written], bits, torch.float32)
    # a code may differ by one where x sits on a rounding boundary
    assert bool(((values - ref_values).abs() <= ref_k_sz.view(-1, 2, 2)[written][..., :1]
                 * 1.001 + 1e-6).all())
    # attention alone: the twin over the very caches the Triton store wrote (bf16 tolerance)
    same_cache = reference.paged_attention(
        case["q"], *caches[:2], case["tables"], case["context_lens"], case["cu"],
        case["max_q_len"], case["max_ctx"], head_dim**-0.5, *caches[2:])
    assert _rel_err(out, same_cache) < 2e-2
    # end to end: an int4 code that rounds the other way moves a value by a whole step (H100 run:
    # 2.9e-2 for int4 at context 300 before the twin rounded half up like the kernel)
    assert _rel_err(out, ref) < {8: 2e-2, 4: 5e-2}[bits]
