"""The decode GEMV (kernels/triton_gemv.py) against F.linear in float64.

Runs on CUDA; skipped without it, unless TRITON_INTERPRET=1 runs it on the CPU through Triton's
interpreter (float16 only there: the interpreter rounds bfloat16 wrongly). Relative error
||out - ref|| / ||ref|| of the float32-accumulated result rounded to the output dtype: < 2e-3
for float16, < 1e-2 for bfloat16.
"""

from __future__ import annotations

import pytest
import torch

from tests.helpers.triton_device import bf16_param, triton_test_device

DEVICE = triton_test_device()

from litedeploy import kernels
from litedeploy.kernels import triton_gemv

_BF16 = bf16_param(DEVICE)
MAX_REL_ERR = {torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    assert not torch.isnan(out).any(), "NaN in kernel output"
    out, ref = out.double(), ref.double()
    return float((out - ref).norm() / ref.norm())


@pytest.mark.parametrize("dtype", [_BF16, torch.float16])
@pytest.mark.parametrize("num_rows", [1, 3, 8])
@pytest.mark.parametrize("n_dim,k_dim", [(100, 300), (64, 1024), (520, 2048)])
@pytest.mark.parametrize("with_bias", [False, True])
def test_gemv_matches_linear(dtype, num_rows, n_dim, k_dim, with_bias) -> None:
    torch.manual_seed(num_rows * 1000 + n_dim + k_dim)
    x = torch.randn(num_rows, k_dim, dtype=dtype, device=DEVICE)
    weight = torch.randn(n_dim, k_dim, dtype=dtype, device=DEVICE) / k_dim**0.5
    bias = torch.randn(n_dim, dtype=dtype, device=DEVICE) if with_bias else None
    out = triton_gemv.gemv(x, weight, bias)
    ref = torch.nn.functional.linear(x.double(), weight.double(),
                                     bias.double() if bias is not None else None)
    assert out.shape == (num_rows, n_dim) and out.dtype == dtype
    assert _rel_err(out, ref) < MAX_REL_ERR[dtype]


@pytest.mark.parametrize("config", [(4, 64, 4), (16, 128, 8), (8, 512, 4)])
def test_gemv_any_tile_config(config) -> None:
    """Every (BLOCK_N, BLOCK_K, warps) a sweep may pick computes the same function."""
    x = torch.randn(2, 700, dtype=torch.float16, device=DEVICE)
    weight = torch.randn(300, 700, dtype=torch.float16, device=DEVICE) / 700**0.5
    ref = torch.nn.functional.linear(x.double(), weight.double())
    assert _rel_err(triton_gemv.gemv(x, weight, config=config), ref) < 2e-3


def test_gemv_reads_strided_rows() -> None:
    """A row-strided x (a slice of a wider activation) reads the right elements."""
    wide = torch.randn(4, 2 * 256, dtype=torch.float16, device=DEVICE)
    x = wide[:, :256]
    weight = torch.randn(48, 256, dtype=torch.float16, device=DEVICE)
    ref = torch.nn.functional.linear(x.double(), weight.double())
    assert _rel_err(triton_gemv.gemv(x, weight), ref) < 2e-3


def test_linear_falls_back_past_the_gemv_rows() -> None:
    """More rows than DISPATCH_MAX_ROWS, 3-D inputs and float32 keep F.linear, bit for bit."""
    weight = torch.randn(32, 64, dtype=torch.float16, device=DEVICE)
    rows = triton_gemv.DISPATCH_MAX_ROWS + 1
    for x in (torch.randn(rows, 64, dtype=torch.float16, device=DEVICE),
              torch.randn(2, 3, 64, dtype=torch.float16, device=DEVICE)):
        assert torch.equal(triton_gemv.linear(x, weight), torch.nn.functional.linear(x, weight))
    w32, x32 = weight.float(), torch.randn(1, 64, device=DEVICE)
    assert torch.equal(triton_gemv.linear(x32, w32), torch.nn.functional.linear(x32, w32))
    x1 = torch.randn(1, 64, dtype=torch.float16, device=DEVICE)
    assert torch.equal(triton_gemv.linear(x1, weight), triton_gemv.gemv(x1, weight))


@pytest.mark.skipif(DEVICE != "cuda", reason="dispatch only swaps modules of CUDA models")
def test_dispatched_linears_keep_parameters_and_results() -> None:
    model = torch.nn.Sequential(torch.nn.Linear(256, 512, bias=False), torch.nn.Linear(512, 64))
    model = model.to(device="cuda", dtype=torch.bfloat16)
    x = torch.randn(1, 256, dtype=torch.bfloat16, device="cuda")  # one row: the GEMV's case
    before = model(x)  # cuBLAS
    state = {k: v.clone() for k, v in model.state_dict().items()}
    assert kernels.use_dispatched_linears(model) == 2
    assert all(isinstance(m, torch.nn.Linear) for m in model)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert _rel_err(model(x), before) < 1e-2


@pytest.mark.parametrize("config", [None, (4, 2, 4), (16, 4, 8)])
@pytest.mark.parametrize("n_dim,k_dim,group_size", [(96, 256, 64), (40, 1024, 128), (24, 768, 32)])
def test_int4_gemv_matches_dequantized_weight(config, n_dim, k_dim, group_size) -> None:
    """Row-form int4 (both nibbles, per-group scale and float zero) against x @ W_deq^T; the
    group count need not divide by the groups a program takes per iteration (768 / 32 = 24)."""
    from litedeploy.kernels import triton_quant_gemm
    from litedeploy.layers.quant_linear import dequantize_int4, quantize_int4

    torch.manual_seed(n_dim + k_dim)
    qweight, scales, zeros = quantize_int4(torch.randn(n_dim, k_dim), group_size)
    zeros = zeros + 0.25  # GGUF Q4_1-style non-integer zero points take the same path
    w_deq = dequantize_int4(qweight, scales, zeros, group_size).double()
    x = torch.randn(1, k_dim, dtype=torch.float16)
    ref = x.double() @ w_deq.T
    assert triton_quant_gemm.int4_gemv_applies(x, group_size)
    long_k = torch.randn(1, 2 * triton_quant_gemm.INT4_GEMV_MAX_K, dtype=torch.float16)
    assert not triton_quant_gemm.int4_gemv_applies(long_k, group_size)  # awq_gemm's case
    out = triton_quant_gemm.int4_gemv(x.to(DEVICE), qweight.to(DEVICE), scales.to(DEVICE),
                                      zeros.to(DEVICE), group_size, config=config)
    assert out.shape == (1, n_dim) and out.dtype == torch.float16
    assert _rel_err(out.cpu(), ref) < 2e-3


@pytest.mark.parametrize("dtype", [_BF16, torch.float16])
@pytest.mark.parametrize("n_dim,k_dim", [(100, 300), (64, 2048)])
def test_gated_gemv_equals_activation_then_gemv(dtype, n_dim, k_dim) -> None:
    # down_proj with silu(gate) * up computed while loading: same rounding as silu_and_mul
    from litedeploy.kernels import reference, triton_activation

    gate_up = 3 * torch.randn(1, 2 * k_dim, dtype=dtype, device=DEVICE)
    weight = torch.randn(n_dim, k_dim, dtype=dtype, device=DEVICE) / k_dim**0.5
    out = triton_gemv.silu_mul_linear(gate_up, weight)
    unfused = triton_gemv.gemv(triton_activation.silu_and_mul(gate_up), weight)
    assert out.shape == (1, n_dim) and out.dtype == dtype
    assert torch.equal(out, unfused)
    ref = torch.nn.functional.linear(reference.silu_and_mul(gate_up).double(), weight.double())
    assert _rel_err(out, ref) < MAX_REL_ERR[dtype]
    # shapes the GEMV does not take come back as None (the caller runs the two steps)
    assert triton_gemv.silu_mul_linear(gate_up.expand(9, -1), weight) is None
