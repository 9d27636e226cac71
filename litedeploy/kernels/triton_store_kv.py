"""Triton twin of `reference.store_kv`: scatter this step's K/V rows into the paged cache.

With quant_bits 8/4 a second kernel quantizes each (token, KV head) vector on the way in, exactly
as `kv_quant.quantize` does (min/max in float32, codes rounded half up).

Imported only when the device is CUDA (it imports triton at module load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from litedeploy.kernels.triton_norm_rope import _load_cos_sin, _rotate_heads


@triton.jit
def _store_kv_kernel(
    k_ptr,
    v_ptr,
    k_cache_ptr,
    v_cache_ptr,
    slot_mapping_ptr,
    num_kv_heads,
    stride_k_token,
    stride_k_head,
    stride_v_token,
    stride_v_head,
    stride_kc_block,
    stride_kc_slot,
    stride_kc_head,
    stride_vc_block,
    stride_vc_slot,
    stride_vc_head,
    BLOCK_SIZE: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padded row: nothing to write
        return
    block_id = slot // BLOCK_SIZE
    block_offset = slot % BLOCK_SIZE
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < num_kv_heads) & (dims[None, :] < HEAD_DIM)
    token64 = token.to(tl.int64)

    k = tl.load(
        k_ptr + token64 * stride_k_token + heads[:, None] * stride_k_head + dims[None, :], mask=mask
    )
    v = tl.load(
        v_ptr + token64 * stride_v_token + heads[:, None] * stride_v_head + dims[None, :], mask=mask
    )
    k_dst = block_id * stride_kc_block + block_offset * stride_kc_slot
    v_dst = block_id * stride_vc_block + block_offset * stride_vc_slot
    tl.store(
        k_cache_ptr + k_dst + heads[:, None] * stride_kc_head + dims[None, :],
        k.to(k_cache_ptr.dtype.element_ty),
        mask=mask,
    )
    tl.store(
        v_cache_ptr + v_dst + heads[:, None] * stride_vc_head + dims[None, :],
        v.to(v_cache_ptr.dtype.element_ty),
        mask=mask,
    )


@triton.jit
def _quantize_store(src_ptr, src_rows, dst_ptr, dst_rows, sz_ptr, sz_rows, head_mask,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BITS: tl.constexpr):
    """Quantize BLOCK_H head vectors (row offsets [BLOCK_H]) and store codes, scale and zero."""
    max_code = (1 << BITS) - 1
    if BITS == 4:  # element 2j in the low nibble of byte j, 2j + 1 in the high one
        half = tl.arange(0, BLOCK_D // 2)
        mask = head_mask[:, None] & (half[None, :] < HEAD_DIM // 2)
        even_ptrs = src_ptr + src_rows[:, None] + 2 * half[None, :]
        even = tl.load(even_ptrs, mask=mask, other=0.0).to(tl.float32)
        odd = tl.load(even_ptrs + 1, mask=mask, other=0.0).to(tl.float32)
        low = tl.minimum(tl.min(tl.where(mask, even, float("inf")), axis=1),
                         tl.min(tl.where(mask, odd, float("inf")), axis=1))
        high = tl.maximum(tl.max(tl.where(mask, even, float("-inf")), axis=1),
                          tl.max(tl.where(mask, odd, float("-inf")), axis=1))
        scale = tl.maximum((high - low) / max_code, 1e-8)
        # (x - min) / scale + 0.5 >= 0.5: truncation is floor, i.e. round half up
        even_codes = tl.minimum(((even - low[:, None]) / scale[:, None] + 0.5).to(tl.int32),
                                max_code)
        odd_codes = tl.minimum(((odd - low[:, None]) / scale[:, None] + 0.5).to(tl.int32),
                               max_code)
        packed = (even_codes | (odd_codes << 4)).to(tl.uint8)
        tl.store(dst_ptr + dst_rows[:, None] + half[None, :], packed, mask=mask)
    else:
        dims = tl.arange(0, BLOCK_D)
        mask = head_mask[:, None] & (dims[None, :] < HEAD_DIM)
        x = tl.load(src_ptr + src_rows[:, None] + dims[None, :], mask=mask, other=0.0)
        x = x.to(tl.float32)
        low = tl.min(tl.where(mask, x, float("inf")), axis=1)
        high = tl.max(tl.where(mask, x, float("-inf")), axis=1)
        scale = tl.maximum((high - low) / max_code, 1e-8)
        codes = tl.minimum(((x - low[:, None]) / scale[:, None] + 0.5).to(tl.int32), max_code)
        tl.store(dst_ptr + dst_rows[:, None] + dims[None, :], codes.to(tl.uint8), mask=mask)
    tl.store(sz_ptr + sz_rows, scale, mask=head_mask)
    tl.store(sz_ptr + sz_rows + 1, low, mask=head_mask)


@triton.jit
def _quant_store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, slot_mapping_ptr, num_kv_heads,
    stride_k_token, stride_k_head, stride_v_token, stride_v_head, stride_cache_slot,
    stride_cache_head, stride_sz_slot, HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr,
    BLOCK_D: tl.constexpr, BITS: tl.constexpr,
):
    """One program per (token, tile of heads); caches and scales are contiguous, so a slot
    (block_id * block_size + offset) addresses its row directly."""
    token = tl.program_id(0)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot < 0:  # padded row: nothing to write
        return
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    head_mask = heads < num_kv_heads
    token64 = token.to(tl.int64)
    dst_rows = slot * stride_cache_slot + heads * stride_cache_head
    sz_rows = slot * stride_sz_slot + heads * 2
    _quantize_store(k_ptr, token64 * stride_k_token + heads * stride_k_head, k_cache_ptr,
                    dst_rows, k_sz_ptr, sz_rows, head_mask, HEAD_DIM, BLOCK_D, BITS)
    _quantize_store(v_ptr, token64 * stride_v_token + heads * stride_v_head, v_cache_ptr,
                    dst_rows, v_sz_ptr, sz_rows, head_mask, HEAD_DIM, BLOCK_D, BITS)


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
    """Write k/v [num_tokens, num_kv_heads, head_dim] at `slot_mapping`; slot -1 rows write nothing."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
    if quant_bits:
        _quant_store_kv(k, v, k_cache, v_cache, slot_mapping, k_scales_zeros, v_scales_zeros,
                        quant_bits)
        return
    assert k_cache.stride(-1) == 1 and v_cache.stride(-1) == 1, (
        "cache must be contiguous in head_dim"
    )
    block_d = triton.next_power_of_2(head_dim)
    # one program per (token, tile of heads); a tile of about 1024 elements keeps registers modest
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    _store_kv_kernel[grid](
        k,
        v,
        k_cache,
        v_cache,
        slot_mapping,
        num_kv_heads,
        k.stride(0),
        k.stride(1),
        v.stride(0),
        v.stride(1),
        k_cache.stride(0),
        k_cache.stride(1),
        k_cache.stride(2),
        v_cache.stride(0),
        v_cache.stride(1),
        v_cache.stride(2),
        BLOCK_SIZE=k_cache.shape[1],
        HEAD_DIM=head_dim,
        BLOCK_H=block_h,
        BLOCK_D=block_d,
        num_warps=4,
    )


def _quant_store_kv(k, v, k_cache, v_cache, slot_mapping, k_sz, v_sz, quant_bits) -> None:
    num_tokens, num_kv_heads, head_dim = k.shape
    for t in (k_cache, v_cache, k_sz, v_sz):
        assert t.is_contiguous(), "quantized caches and scales must be contiguous"
    assert k_cache.shape == v_cache.shape and k_sz.shape == v_sz.shape
    block_d = triton.next_power_of_2(head_dim)
    block_h = min(triton.next_power_of_2(num_kv_heads), max(1, 1024 // block_d))
    grid = (num_tokens, triton.cdiv(num_kv_heads, block_h))
    # fmt: off
    _quant_store_kv_kernel[grid](
        k, v, k_cache, v_cache, k_sz, v_sz, slot_mapping, num_kv_heads, k.stride(0), k.stride(1),
        v.stride(0), v.stride(1), k_cache.stride(1), k_cache.stride(2), k_sz.stride(1),
        HEAD_DIM=head_dim, BLOCK_H=block_h, BLOCK_D=block_d, BITS=quant_bits, num_warps=4,
    )
    # fmt: on


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, k_cache_ptr, v_cache_ptr, slot_mapping_ptr, num_heads,
    num_kv_heads, stride_q_token, stride_q_head, stride_k_token, stride_k_head, stride_v_token,
    stride_v_head, stride_cos_token, stride_sin_token, stride_cache_slot, stride_cache_head,
    HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    """One program per token: q rotated in place; k rotated on its way into the cache, v copied.
    The rotation is `triton_norm_rope._rope_kernel`'s: float32 products, rounded to q/k's dtype."""
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos_token, stride_sin_token,
                             HALF_DIM, BLOCK_HALF)
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF_DIM
    _rotate_heads(q_ptr, token, stride_q_token, stride_q_head, num_heads, cos, sin, BLOCK_HQ,
                  HALF_DIM, BLOCK_HALF)
    slot = tl.load(slot_mapping_ptr + token).to(tl.int64)
    if slot >= 0:  # padded rows (slot -1) write nothing
        heads = tl.arange(0, BLOCK_HK)
        mask = (heads[:, None] < num_kv_heads) & dim_mask[None, :]
        k_first = k_ptr + token * stride_k_token + heads[:, None] * stride_k_head + dims[None, :]
        k1 = tl.load(k_first, mask=mask, other=0.0).to(tl.float32)
        k2 = tl.load(k_first + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
        out1 = (k1 * cos[None, :] - k2 * sin[None, :]).to(k_ptr.dtype.element_ty)
        out2 = (k2 * cos[None, :] + k1 * sin[None, :]).to(k_ptr.dtype.element_ty)
        dst = slot * stride_cache_slot + heads[:, None] * stride_cache_head + dims[None, :]
        tl.store(k_cache_ptr + dst, out1.to(k_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(k_cache_ptr + dst + HALF_DIM, out2.to(k_cache_ptr.dtype.element_ty), mask=mask)
        v_first = v_ptr + token * stride_v_token + heads[:, None] * stride_v_head + dims[None, :]
        v1 = tl.load(v_first, mask=mask, other=0.0)
        v2 = tl.load(v_first + HALF_DIM, mask=mask, other=0.0)
        tl.store(v_cache_ptr + dst, v1.to(v_cache_ptr.dtype.element_ty), mask=mask)
        tl.store(v_cache_ptr + dst + HALF_DIM, v2.to(v_cache_ptr.dtype.element_ty), mask=mask)


def rope_store_kv(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """`apply_rope(q, k, cos, sin)` then `store_kv(k, v, ...)` in one launch (float caches).

    q [T, H, D] is rotated in place (views of a fused qkv output are fine: unit stride along D);
    k [T, KVH, D] is read and its rotation goes to the cache only, k itself is left as it was.
    Same bits as the two kernels one after the other.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("rope_store_kv rotates q in place and needs unit stride along head_dim")
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "caches must be contiguous"
    assert k_cache.shape == v_cache.shape and k_cache.shape[2:] == (num_kv_heads, head_dim)
    if num_tokens == 0:
        return
    v = _last_dim_contiguous(v)
    half_dim = head_dim // 2
    # fmt: off
    _rope_store_kv_kernel[(num_tokens,)](
        q, k, v, cos, sin, k_cache, v_cache, slot_mapping, num_heads, num_kv_heads, q.stride(0),
        q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos.stride(0),
        sin.stride(0), k_cache.stride(1), k_cache.stride(2), HALF_DIM=half_dim,
        BLOCK_HALF=triton.next_power_of_2(half_dim), BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads), num_warps=4,
    )
    # fmt: on
