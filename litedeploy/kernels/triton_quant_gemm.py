"""Triton weight-only GEMMs: int4 AWQ layout (asymmetric, grouped) and int8 per channel.

Imported lazily, on CUDA only. y[M, N] = x[M, K] @ dequant(W)[K, N]: each program owns a
[BLOCK_M, BLOCK_N] output tile and walks K, unpacking nibbles in registers, so the weights cross
memory as 4 (or 8) bits: decode is bandwidth bound, hence the speed-up over 16-bit weights.
"""

from __future__ import annotations

import functools
import os

import torch
import triton
import triton.language as tl


@triton.jit
def _unpack_awq(packed, BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """[BLOCK_K, BLOCK_N // 8] int32 -> [BLOCK_K, BLOCK_N] codes 0..15, each int32 read once.
    Column c of a group of 8 sits in nibble AWQ_ORDER.index(c): shifts (0,16,4,20,8,24,12,28)."""
    col = tl.arange(0, 8)
    shifts = ((col // 2) + (col % 2) * 4) * 4
    codes = (packed[:, :, None] >> shifts[None, None, :]) & 0xF
    return tl.reshape(codes, (BLOCK_K, BLOCK_N))


@triton.jit
def _awq_gemm_kernel(
    x_ptr, qweight_ptr, scales_ptr, zeros_ptr, out_ptr, M, N, K, group_size, k_per_split,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n8 = pid_n * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    n_mask = offs_n < N
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    k_start = pid_k * k_per_split
    k_end = tl.minimum(K, k_start + k_per_split)
    for k0 in range(k_start, k_end, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        packed = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + offs_n8[None, :],
                         mask=(offs_k[:, None] < K) & (offs_n8[None, :] < N // 8), other=0)
        q = _unpack_awq(packed, BLOCK_K, BLOCK_N).to(tl.float32)
        # BLOCK_K divides group_size: the whole K tile shares one row of scales and zeros
        group = k0 // group_size
        scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
        w = ((q - zero[None, :]) * scale[None, :]).to(x.dtype)
        acc += tl.dot(x, w)
    out_mask = (offs_m[:, None] < M) & n_mask[None, :]
    out_offsets = offs_m[:, None] * N + offs_n[None, :]
    if SPLIT_K == 1:
        tl.store(out_ptr + out_offsets, acc.to(out_ptr.dtype.element_ty), mask=out_mask)
    else:  # partial sums over K slices meet in a float32 buffer
        tl.atomic_add(out_ptr + out_offsets, acc, mask=out_mask)


@triton.jit
def _awq_dequant_kernel(qweight_ptr, scales_ptr, zeros_ptr, out_ptr, N, K, group_size,
                        BLOCK_K: tl.constexpr, BLOCK_N: tl.constexpr):
    """Unpack and dequantize a [BLOCK_K, BLOCK_N] tile of W [K, N] (input dtype of out)."""
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_n8 = tl.program_id(1) * (BLOCK_N // 8) + tl.arange(0, BLOCK_N // 8)
    packed = tl.load(qweight_ptr + offs_k[:, None] * (N // 8) + offs_n8[None, :],
                     mask=(offs_k[:, None] < K) & (offs_n8[None, :] < N // 8), other=0)
    q = _unpack_awq(packed, BLOCK_K, BLOCK_N).to(tl.float32)
    group = (tl.program_id(0) * BLOCK_K) // group_size  # BLOCK_K divides group_size
    n_mask = offs_n < N
    scale = tl.load(scales_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    zero = tl.load(zeros_ptr + group * N + offs_n, mask=n_mask, other=0.0).to(tl.float32)
    w = (q - zero[None, :]) * scale[None, :]
    tl.store(out_ptr + offs_k[:, None] * N + offs_n[None, :], w.to(out_ptr.dtype.element_ty),
             mask=(offs_k[:, None] < K) & n_mask[None, :])


@triton.jit
def _int4_gemv_kernel(
    x_ptr, q_ptr, scales_ptr, zeros_ptr, out_ptr, N, K,
    GROUP: tl.constexpr, BLOCK_N: tl.constexpr, GROUPS: tl.constexpr,
):
    """One-row GEMV over the row form: q uint8 [N, K/2] (k = 2j in the low nibble of byte j),
    scales/zeros [N, K/G]. Each program streams BLOCK_N rows of packed bytes along K (the
    contiguous dimension), GROUPS quantization groups per iteration, in one launch. Per group
    sum_k x_k (q_k - z) s = s * (sum_k x_k q_k - z * sum_k x_k): one scale and zero per row and
    group, not per element."""
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    half_k = K // 2
    num_groups = K // GROUP
    offs_g = tl.arange(0, GROUPS)
    offs_b = tl.arange(0, GROUP // 2)
    acc = tl.zeros((BLOCK_N,), dtype=tl.float32)
    for g0 in range(0, num_groups, GROUPS):
        group = g0 + offs_g  # [GROUPS]
        g_mask = group < num_groups
        byte = group[:, None] * (GROUP // 2) + offs_b[None, :]  # [GROUPS, G/2]
        packed = tl.load(q_ptr + rows_n[:, None, None] * half_k + byte[None, :, :],
                         mask=g_mask[None, :, None], other=0, eviction_policy="evict_first")
        x_lo = tl.load(x_ptr + 2 * byte, mask=g_mask[:, None], other=0.0).to(tl.float32)
        x_hi = tl.load(x_ptr + 2 * byte + 1, mask=g_mask[:, None], other=0.0).to(tl.float32)
        lo = (packed & 0xF).to(tl.float32)
        hi = (packed >> 4).to(tl.float32)
        dot = tl.sum(lo * x_lo[None, :, :] + hi * x_hi[None, :, :], axis=2)  # [BLOCK_N, GROUPS]
        x_sum = tl.sum(x_lo + x_hi, axis=1)  # [GROUPS]
        sz = rows_n[:, None] * num_groups + group[None, :]
        scale = tl.load(scales_ptr + sz, mask=g_mask[None, :], other=0.0).to(tl.float32)
        zero = tl.load(zeros_ptr + sz, mask=g_mask[None, :], other=0.0).to(tl.float32)
        acc += tl.sum(scale * (dot - zero * x_sum[None, :]), axis=1)
    tl.store(out_ptr + offs_n, acc.to(out_ptr.dtype.element_ty), mask=offs_n < N)


@triton.jit
def _int8_gemm_kernel(
    x_ptr, w_ptr, scales_ptr, out_ptr, M, N, K,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        x = tl.load(x_ptr + offs_m[:, None] * K + offs_k[None, :],
                    mask=(offs_m[:, None] < M) & (offs_k[None, :] < K), other=0.0)
        # weight is [N, K] row-major: load its transpose tile [BLOCK_K, BLOCK_N]
        w = tl.load(w_ptr + offs_n[None, :] * K + offs_k[:, None],
                    mask=(offs_k[:, None] < K) & (offs_n[None, :] < N), other=0)
        acc += tl.dot(x, w.to(x.dtype))
    scale = tl.load(scales_ptr + offs_n, mask=offs_n < N, other=0.0).to(tl.float32)
    acc = acc * scale[None, :]
    tl.store(out_ptr + offs_m[:, None] * N + offs_n[None, :], acc.to(out_ptr.dtype.element_ty),
             mask=(offs_m[:, None] < M) & (offs_n[None, :] < N))


def _blocks(num_rows: int) -> tuple[int, int, int]:
    # decode (few rows): narrow M tile, wide N for bandwidth; prefill: square-ish tiles
    if num_rows <= 16:
        return 16, 64, 128
    return 64, 128, 64


# from this many rows on, dequantizing W once and calling cuBLAS beats the fused kernel: the
# weight's unpack is then paid once per step, not once per 64-row tile
DEQUANT_MIN_ROWS = 64


def awq_dequantize(qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
                   group_size: int, dtype: torch.dtype) -> torch.Tensor:
    """W [K, N] in dtype from the AWQ tensors."""
    k_dim, n_dim = qweight.shape[0], qweight.shape[1] * 8
    out = torch.empty(k_dim, n_dim, dtype=dtype, device=qweight.device)
    block_k, block_n = 32, 128
    assert group_size % block_k == 0, f"group size {group_size} is not a multiple of {block_k}"
    grid = (triton.cdiv(k_dim, block_k), triton.cdiv(n_dim, block_n))
    _awq_dequant_kernel[grid](qweight, scales, zeros, out, n_dim, k_dim, group_size,
                              BLOCK_K=block_k, BLOCK_N=block_n, num_warps=4)
    return out


def awq_gemm(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
             group_size: int) -> torch.Tensor:
    """x [M, K] fp16/bf16, qweight int32 [K, N/8] (AWQ order), scales/zeros [K/G, N] -> [M, N]."""
    if x.dtype == torch.float32:  # tl.dot wants 16-bit inputs for tensor cores
        return awq_gemm(x.to(torch.bfloat16), qweight, scales, zeros, group_size).float()
    x = x.contiguous()
    num_rows, k_dim = x.shape
    if num_rows >= DEQUANT_MIN_ROWS and group_size % 32 == 0:
        return x @ awq_dequantize(qweight, scales, zeros, group_size, x.dtype)
    n_dim = qweight.shape[1] * 8
    block_m, block_n, block_k = _blocks(num_rows)
    block_k = min(block_k, group_size)  # one group per K tile keeps the scale loads simple
    num_tiles = triton.cdiv(num_rows, block_m) * triton.cdiv(n_dim, block_n)
    split_k = 1
    if num_rows <= 16:
        # decode: a 2048-wide output is only 32 tiles, far from filling the GPU; slices of K
        # in parallel make enough programs to stream the packed weights at full bandwidth
        split_k = max(1, min(k_dim // block_k, triton.cdiv(2 * _num_sms(x.device), num_tiles)))
    k_per_split = triton.cdiv(triton.cdiv(k_dim, split_k), block_k) * block_k
    split_k = triton.cdiv(k_dim, k_per_split)
    if split_k > 1:
        out = torch.zeros(num_rows, n_dim, dtype=torch.float32, device=x.device)
    else:
        out = torch.empty(num_rows, n_dim, dtype=x.dtype, device=x.device)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n_dim, block_n), split_k)
    _awq_gemm_kernel[grid](x, qweight, scales, zeros, out, num_rows, n_dim, k_dim, group_size,
                           k_per_split, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           SPLIT_K=split_k, num_warps=4, num_stages=2)
    return out.to(x.dtype) if split_k > 1 else out


# On an H200 at one row the GEMV beat awq_gemm for K = 2048 (qkv 7.7 vs 12.1 us, o_proj 5.6 vs
# 8.5, gate_up 17.3 vs 28.6) and lost at K = 8192 (down_proj 26.7 vs 19.2): a long K walk per
# program is bound by the unpacking arithmetic, where awq_gemm's split-K spreads it
INT4_GEMV_MAX_K = 4096


def int4_gemv_applies(x: torch.Tensor, group_size: int) -> bool:
    """One row of 16-bit x, K <= INT4_GEMV_MAX_K and a power-of-two group of at least 16: the
    GEMV's case (the rest go to awq_gemm). LITEDEPLOY_INT4_GEMV=0 turns it off (benchmarks)."""
    return (x.shape[0] == 1 and x.shape[1] <= INT4_GEMV_MAX_K
            and x.dtype in (torch.float16, torch.bfloat16)
            and group_size >= 16 and group_size & (group_size - 1) == 0
            and os.environ.get("LITEDEPLOY_INT4_GEMV", "1") != "0")


def int4_gemv(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor,
              group_size: int, config: tuple[int, int, int] | None = None) -> torch.Tensor:
    """x [1, K] fp16/bf16, row form qweight uint8 [N, K/2], scales and zeros [N, K/G] -> [1, N].
    `config` = (BLOCK_N, GROUPS, num_warps) overrides the heuristic (benchmark sweeps)."""
    k_dim = x.shape[1]
    n_dim = qweight.shape[0]
    assert x.shape[0] == 1 and qweight.shape[1] * 2 == k_dim, (x.shape, qweight.shape)
    x = x.contiguous()
    out = torch.empty(1, n_dim, dtype=x.dtype, device=x.device)
    if config is None:
        block_n = 16
        while block_n > 4 and triton.cdiv(n_dim, block_n) < 2 * _num_sms(x.device):
            block_n //= 2
        # ~8 KB of packed weights per program and iteration (32 KB of bf16's worth)
        groups = max(1, min(triton.next_power_of_2(k_dim // group_size),
                            8192 // (block_n * group_size // 2)))
        config = (block_n, groups, 8)
    block_n, groups, num_warps = config
    _int4_gemv_kernel[(triton.cdiv(n_dim, block_n),)](
        x, qweight, scales, zeros, out, n_dim, k_dim,
        GROUP=group_size, BLOCK_N=block_n, GROUPS=groups, num_warps=num_warps,
    )
    return out


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter on CPU: behave like an H100
    return torch.cuda.get_device_properties(device).multi_processor_count


def int8_gemm(x: torch.Tensor, weight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """x [M, K] fp16/bf16, weight int8 [N, K], scales [N] -> [M, N]."""
    if x.dtype == torch.float32:
        return int8_gemm(x.to(torch.bfloat16), weight, scales).float()
    x = x.contiguous()
    num_rows, k_dim = x.shape
    n_dim = weight.shape[0]
    out = torch.empty(num_rows, n_dim, dtype=x.dtype, device=x.device)
    block_m, block_n, block_k = _blocks(num_rows)
    grid = (triton.cdiv(num_rows, block_m), triton.cdiv(n_dim, block_n))
    _int8_gemm_kernel[grid](x, weight, scales, out, num_rows, n_dim, k_dim,
                            BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                           num_warps=4, num_stages=2)  # fits consumer GPUs' shared memory
    return out
