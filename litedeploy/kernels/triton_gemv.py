"""Triton GEMV for batch-1 decode: y[M, N] = x[M, K] @ W[N, K]^T (+ bias), M <= 8 (used at 1).

At batch 1 a decode step is a stream of weight reads: ~3.4 GB a step for the InternLM2-1.8B shape.
cuBLAS picks tensor-core GEMM tiles of 64+ rows for M = 1, which leaves small matrices (o_proj's
2048 x 2048 is 8 MB, two microseconds at full bandwidth) far under the copy bandwidth. Here each
program owns BLOCK_N output features and streams their rows of W once, BLOCK_K wide (16-byte
loads along K, the weight's contiguous dimension), multiplying on CUDA cores: M rows of x share
every weight load. Enough programs (N / BLOCK_N of them) keep every multiprocessor reading, so no
split-K (and none of its zero-fill and reduce launches) is needed for the shapes of a decoder.

Imported lazily, on CUDA only (Triton's interpreter runs it on CPU in the tests).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

MAX_GEMV_ROWS = 8  # what the kernel takes (one x row at a time against each weight tile)
# what `linear` sends it: on an H200 the GEMV beat cuBLAS at 1 row for every decoder shape
# (o_proj 4.7 vs 6.3 us, down 12.9 vs 15.1, lm_head 87 vs 97) but lost from 2 rows on (o_proj
# 7.4 vs 6.4 us at 2 rows, 13.5 vs 6.4 at 8): its per-row reductions cost more than cuBLAS's
# tensor-core tiles, which read the weight once for any row count up to 64
DISPATCH_MAX_ROWS = 1


@triton.jit
def _gemv_kernel(
    x_ptr, w_ptr, bias_ptr, out_ptr, M, N, K, stride_xm, stride_wn, stride_om,
    HAS_BIAS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, GATED: tl.constexpr,
):
    pid_n = tl.program_id(0)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_m = tl.arange(0, BLOCK_M)
    n_mask = offs_n < N
    m_mask = offs_m < M
    # clamped row index: the loads of the last program stay in bounds without a mask on N
    rows_n = tl.minimum(offs_n, N - 1).to(tl.int64)
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        k_mask = offs_k < K
        w_ptrs = w_ptr + rows_n[:, None] * stride_wn + offs_k[None, :]
        if EVEN_K:
            w = tl.load(w_ptrs, eviction_policy="evict_first")  # [BLOCK_N, BLOCK_K]
        else:
            w = tl.load(w_ptrs, mask=k_mask[None, :], other=0.0, eviction_policy="evict_first")
        w = w.to(tl.float32)
        # one row of x at a time: registers hold the weight tile once, whatever M is
        for m in tl.static_range(BLOCK_M):
            x_mask = k_mask & ((offs_k * 0 + m) < M)  # padding rows read zeros
            if GATED:
                # x = silu(gate) * up of a packed [gate | up] row, rounded as
                # triton_activation.silu_and_mul rounds it (silu, then the product)
                gate = tl.load(x_ptr + m * stride_xm + offs_k, mask=x_mask, other=0.0)
                up = tl.load(x_ptr + m * stride_xm + K + offs_k, mask=x_mask, other=0.0)
                gate = gate.to(tl.float32)
                act = (gate * tl.sigmoid(gate)).to(x_ptr.dtype.element_ty)
                x = (act.to(tl.float32) * up.to(tl.float32)).to(x_ptr.dtype.element_ty)
            else:
                x = tl.load(x_ptr + m * stride_xm + offs_k, mask=x_mask, other=0.0)
            part = tl.sum(w * x.to(tl.float32)[None, :], axis=1)  # [BLOCK_N]
            acc += tl.where(offs_m[:, None] == m, part[None, :], 0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@functools.lru_cache(maxsize=8)
def _num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return 132  # Triton's interpreter on CPU: behave like an H100/H200
    return torch.cuda.get_device_properties(device).multi_processor_count


def pick_config(num_rows: int, n_dim: int, k_dim: int, num_sms: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps), from a sweep at one row on an H200 (bench.gemv_bench):
    narrow outputs (N <= 4096: qkv, o_proj, down_proj) want [4-8, 1024] tiles on 8 warps, which
    give 256-512 programs; wide ones (gate_up, lm_head) [8, 512] on 4 warps."""
    block_k = min(1024 if n_dim <= 4096 else 512, triton.next_power_of_2(k_dim))
    num_warps = 8 if block_k >= 1024 else 4
    block_n = 8
    while block_n > 4 and triton.cdiv(n_dim, block_n) < 3 * num_sms:
        block_n //= 2
    return block_n, block_k, num_warps


def gemv(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None,
         config: tuple[int, int, int] | None = None, gated: bool = False) -> torch.Tensor:
    """x [M, K] (M <= MAX_GEMV_ROWS), weight [N, K], bias [N] or None -> [M, N] in x's dtype.

    gated: x is a packed [M, 2K] gate|up row and the GEMV's input is silu(gate) * up, computed
    while loading (SwiGLU's down_proj without the activation's own launch and round trip).
    `config` = (BLOCK_N, BLOCK_K, num_warps) overrides the heuristic (benchmark sweeps)."""
    num_rows, k_dim = x.shape[0], x.shape[1] // 2 if gated else x.shape[1]
    n_dim = weight.shape[0]
    assert num_rows <= MAX_GEMV_ROWS and weight.shape[1] == k_dim, (x.shape, weight.shape)
    if x.stride(1) != 1:
        x = x.contiguous()
    if weight.stride(1) != 1:
        weight = weight.contiguous()
    out = torch.empty(num_rows, n_dim, dtype=x.dtype, device=x.device)
    block_n, block_k, num_warps = config or pick_config(num_rows, n_dim, k_dim,
                                                        _num_sms(x.device))
    grid = (triton.cdiv(n_dim, block_n),)
    _gemv_kernel[grid](
        x, weight, bias if bias is not None else weight, out, num_rows, n_dim, k_dim,
        x.stride(0), weight.stride(0), out.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=max(1, triton.next_power_of_2(num_rows)),
        BLOCK_N=block_n, BLOCK_K=block_k, EVEN_K=k_dim % block_k == 0, GATED=gated,
        num_warps=num_warps,
    )
    return out


def linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """F.linear with the GEMV for 2-D inputs of at most DISPATCH_MAX_ROWS rows in 16-bit floats."""
    if (x.dim() == 2 and 0 < x.shape[0] <= DISPATCH_MAX_ROWS
            and x.dtype in (torch.bfloat16, torch.float16) and weight.dtype == x.dtype):
        return gemv(x, weight, bias)
    return torch.nn.functional.linear(x, weight, bias)


def silu_mul_linear(gate_up: torch.Tensor, weight: torch.Tensor,
                    bias: torch.Tensor | None = None) -> torch.Tensor | None:
    """F.linear(silu(gate) * up, weight, bias) for a packed [rows, 2K] gate|up input, in one
    GEMV launch, where `linear` would take the GEMV; None elsewhere (the caller runs the
    activation and the linear separately)."""
    if (gate_up.dim() == 2 and 0 < gate_up.shape[0] <= DISPATCH_MAX_ROWS
            and gate_up.dtype in (torch.bfloat16, torch.float16) and weight.dtype == gate_up.dtype
            and gate_up.shape[1] == 2 * weight.shape[1]):
        return gemv(gate_up, weight, bias, gated=True)
    return None
