"""Triton twin of `reference.store_kv`: scatter this step's K/V rows into the paged cache.

Imported only when the device is CUDA (it imports triton at module load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


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


def store_kv(
    k: torch.Tensor,
    v: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    slot_mapping: torch.Tensor,
) -> None:
    """Write k/v [num_tokens, num_kv_heads, head_dim] at `slot_mapping`; slot -1 rows write nothing."""
    num_tokens, num_kv_heads, head_dim = k.shape
    if num_tokens == 0:
        return
    k, v = _last_dim_contiguous(k), _last_dim_contiguous(v)
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


def _last_dim_contiguous(x: torch.Tensor) -> torch.Tensor:
    return x if x.stride(-1) == 1 else x.contiguous()
