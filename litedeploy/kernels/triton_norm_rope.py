"""Triton twins of `reference.rms_norm` (fused residual add) and `reference.apply_rope` (NeoX).

Imported only when the device is CUDA (it imports triton at module load).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl
from triton.language.extra import libdevice


@triton.jit
def _rms_norm_kernel(
    x_ptr,
    residual_ptr,
    weight_ptr,
    out_ptr,
    residual_out_ptr,
    hidden_size,
    eps,
    stride_x_row,
    stride_residual_row,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    mask = cols < hidden_size
    x = tl.load(x_ptr + row * stride_x_row + cols, mask=mask, other=0.0)
    if HAS_RESIDUAL:
        residual = tl.load(residual_ptr + row * stride_residual_row + cols, mask=mask, other=0.0)
        # the sum is rounded to the input dtype first, as torch's `x + residual` does
        x = (x.to(tl.float32) + residual.to(tl.float32)).to(x_ptr.dtype.element_ty)
        tl.store(residual_out_ptr + row * hidden_size + cols, x, mask=mask)
    x32 = x.to(tl.float32)
    variance = tl.sum(x32 * x32, axis=0) / hidden_size
    normed = (x32 * tl.rsqrt(variance + eps)).to(x_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=mask, other=0.0)
    out = normed.to(tl.float32) * weight.to(tl.float32)
    tl.store(out_ptr + row * hidden_size + cols, out.to(out_ptr.dtype.element_ty), mask=mask)


def rms_norm(
    x: torch.Tensor,
    weight: torch.Tensor,
    eps: float,
    residual: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Returns (normed, new_residual); with `residual`, x + residual is normalized (one pass)."""
    hidden_size = x.shape[-1]
    x2d = _rows(x)
    out_dtype = torch.promote_types(weight.dtype, x.dtype)
    out = torch.empty(x.shape, dtype=out_dtype, device=x.device)
    residual2d = _rows(residual) if residual is not None else x2d
    residual_out = (
        torch.empty_like(x, memory_format=torch.contiguous_format) if residual is not None else x
    )
    num_rows = x2d.shape[0]
    if num_rows == 0:
        return out, residual_out
    block = triton.next_power_of_2(hidden_size)
    _rms_norm_kernel[(num_rows,)](
        x2d,
        residual2d,
        weight,
        out,
        residual_out,
        hidden_size,
        eps,
        x2d.stride(0),
        residual2d.stride(0),
        HAS_RESIDUAL=residual is not None,
        BLOCK=block,
        num_warps=_warps_for(block),
    )
    return out, residual_out


@triton.jit
def _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos_token, stride_sin_token,
                  HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's cos and sin halves, in float32 (the rotation's precision)."""
    dims = tl.arange(0, BLOCK_HALF)
    dim_mask = dims < HALF_DIM
    cos = tl.load(cos_ptr + token * stride_cos_token + dims, mask=dim_mask, other=0.0)
    sin = tl.load(sin_ptr + token * stride_sin_token + dims, mask=dim_mask, other=0.0)
    return cos.to(tl.float32), sin.to(tl.float32)


@triton.jit
def _rotate_heads(
    x_ptr,
    token,
    stride_token,
    stride_head,
    num_heads,
    cos,
    sin,
    BLOCK_H: tl.constexpr,
    HALF_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    dims = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < num_heads) & (dims[None, :] < HALF_DIM)
    first = x_ptr + token * stride_token + heads[:, None] * stride_head + dims[None, :]
    x1 = tl.load(first, mask=mask, other=0.0).to(tl.float32)
    x2 = tl.load(first + HALF_DIM, mask=mask, other=0.0).to(tl.float32)
    out1 = x1 * cos[None, :] - x2 * sin[None, :]
    out2 = x2 * cos[None, :] + x1 * sin[None, :]
    tl.store(first, out1.to(x_ptr.dtype.element_ty), mask=mask)
    tl.store(first + HALF_DIM, out2.to(x_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _rope_kernel(
    q_ptr,
    k_ptr,
    cos_ptr,
    sin_ptr,
    num_heads,
    num_kv_heads,
    stride_q_token,
    stride_q_head,
    stride_k_token,
    stride_k_head,
    stride_cos_token,
    stride_sin_token,
    HALF_DIM: tl.constexpr,
    BLOCK_HALF: tl.constexpr,
    BLOCK_HQ: tl.constexpr,
    BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    cos, sin = _load_cos_sin(cos_ptr, sin_ptr, token, stride_cos_token, stride_sin_token,
                             HALF_DIM, BLOCK_HALF)
    _rotate_heads(
        q_ptr,
        token,
        stride_q_token,
        stride_q_head,
        num_heads,
        cos,
        sin,
        BLOCK_HQ,
        HALF_DIM,
        BLOCK_HALF,
    )
    _rotate_heads(
        k_ptr,
        token,
        stride_k_token,
        stride_k_head,
        num_kv_heads,
        cos,
        sin,
        BLOCK_HK,
        HALF_DIM,
        BLOCK_HALF,
    )


def apply_rope(
    q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """NeoX rotary embedding IN PLACE on q [T, H, D] and k [T, KVH, D]; returns (q, k).

    cos/sin are [T, D/2] float32. Views (e.g. q/k sliced out of a fused qkv output) are rotated
    where they lie, provided their last dim is contiguous.
    """
    num_tokens, num_heads, head_dim = q.shape
    num_kv_heads = k.shape[1]
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError("apply_rope works in place and needs q and k contiguous in head_dim")
    if num_tokens == 0:
        return q, k
    half_dim = head_dim // 2
    block_half = triton.next_power_of_2(half_dim)
    _rope_kernel[(num_tokens,)](
        q,
        k,
        cos,
        sin,
        num_heads,
        num_kv_heads,
        q.stride(0),
        q.stride(1),
        k.stride(0),
        k.stride(1),
        cos.stride(0),
        sin.stride(0),
        HALF_DIM=half_dim,
        BLOCK_HALF=block_half,
        BLOCK_HQ=triton.next_power_of_2(num_heads),
        BLOCK_HK=triton.next_power_of_2(num_kv_heads),
        num_warps=4,
    )
    return q, k


def _rows(x: torch.Tensor) -> torch.Tensor:
    """[..., hidden] -> [rows, hidden] with a contiguous last dim (a view when possible)."""
    x2d = x.reshape(-1, x.shape[-1])
    return x2d if x2d.stride(-1) == 1 else x2d.contiguous()


def _warps_for(block: int) -> int:
    # one warp per 256 elements keeps 8 values per thread, capped at a full 16-warp block
    return max(1, min(16, block // 256))


@triton.jit
def _cos_sin_kernel(
    positions_ptr, rope_lens_ptr, inv_freq_ptr, params_ptr, cos_ptr, sin_ptr,
    HALF_DIM: tl.constexpr, BLOCK_HALF: tl.constexpr, DYNAMIC: tl.constexpr,
):
    """cos/sin [T, D/2] of one token per program, with the operations of the torch code in
    `layers.rotary` (float64 NTK base, float32 rest; libdevice pow/cos/sin, IEEE division, a
    division by a scalar as a product with its reciprocal, as torch does it). Not the same bits
    as torch's kernels for dynamic NTK: on an H200, a quarter of the values differed, by up to
    4e-3 at positions up to 40k (inv_freq a few units in the last place apart, times a large
    angle); the default RoPE matched to 1e-6 in the tests. Every CUDA path (eager, graphs,
    bursts) uses it."""
    token = tl.program_id(0).to(tl.int64)
    dims = tl.arange(0, BLOCK_HALF)
    mask = dims < HALF_DIM
    position = tl.load(positions_ptr + token).to(tl.float32)
    if DYNAMIC:
        # params (float64): theta, factor, 1 / max_pos, factor - 1, dim / (dim - 2), max_pos,
        # float32(1) / float32(dim)
        theta = tl.load(params_ptr)
        factor = tl.load(params_ptr + 1)
        inv_max_pos = tl.load(params_ptr + 2)
        factor_minus_one = tl.load(params_ptr + 3)
        exponent = tl.load(params_ptr + 4)
        max_pos = tl.load(params_ptr + 5)
        inv_dim = tl.load(params_ptr + 6).to(tl.float32)
        length = tl.maximum(tl.load(rope_lens_ptr + token).to(tl.float64), max_pos)
        ntk = factor * length * inv_max_pos - factor_minus_one
        base = (theta * libdevice.pow(ntk, exponent)).to(tl.float32)
        exponents = (2 * dims).to(tl.float32) * inv_dim
        ones = tl.full([BLOCK_HALF], 1.0, tl.float32)
        inv_freq = tl.math.div_rn(ones, libdevice.pow(tl.zeros_like(exponents) + base, exponents))
    else:
        inv_freq = tl.load(inv_freq_ptr + dims, mask=mask, other=0.0).to(tl.float32)
    freqs = position * inv_freq
    tl.store(cos_ptr + token * HALF_DIM + dims, libdevice.cos(freqs), mask=mask)
    tl.store(sin_ptr + token * HALF_DIM + dims, libdevice.sin(freqs), mask=mask)


def rope_cos_sin(
    positions: torch.Tensor, inv_freq: torch.Tensor, rope_lens: torch.Tensor | None = None,
    dynamic_params: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """`RotaryEmbedding.forward` in one launch instead of ~18 small ones: positions [T] (and for
    dynamic NTK rope_lens [T] with `dynamic_params`, see `_cos_sin_kernel`) -> cos, sin [T, D/2]
    float32. H200, batch 1 in a CUDA graph: 2.1 us against 24 us for the torch code."""
    num_tokens, half_dim = positions.shape[0], inv_freq.shape[0]
    cos = torch.empty(num_tokens, half_dim, dtype=torch.float32, device=positions.device)
    sin = torch.empty_like(cos)
    if num_tokens:
        dynamic = dynamic_params is not None
        # fmt: off
        _cos_sin_kernel[(num_tokens,)](
            positions, rope_lens if dynamic else positions, inv_freq,
            dynamic_params if dynamic else inv_freq, cos, sin, HALF_DIM=half_dim,
            BLOCK_HALF=triton.next_power_of_2(half_dim), DYNAMIC=dynamic, num_warps=1,
            # each product and sum rounded on its own, as in torch's separate kernels (FMA
            # contraction on gave as many differing values; this is the measured setting)
            enable_fp_fusion=False,
        )
        # fmt: on
    return cos, sin
