"""Many-row int4 linears on CPU (layers/int4pack_cpu.py): the weight dequantized from PyTorch's
int4pack layout once per call, then a bf16 GEMM, against the row form and the int4 kernel.

Bounds: the dequantized weight equals the kernel's own (its output for the identity) to one
bf16 rounding (relative 2^-8 per element); a linear's output over many rows is as close to x @ W_deq (float64) as the kernel's
output over few rows (both ~3e-3: bf16 activations and outputs), bound 1e-2.
"""

from __future__ import annotations

import pytest
import torch

from litedeploy.layers import int4pack_cpu
from litedeploy.layers.quant_linear import Int4Linear, dequantize_int4, quantize_int4

pytestmark = pytest.mark.skipif(not int4pack_cpu.int4pack_layout_known(),
                                reason="this build packs int4 differently: the kernel serves all")


def _layer(out_features: int, in_features: int, group_size: int) -> tuple[Int4Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    layer = Int4Linear(in_features, out_features, group_size=group_size)
    qweight, scales, zeros = quantize_int4(weight, group_size)
    zeros = zeros + torch.rand(zeros.shape, generator=gen) - 0.5  # GGUF Q4_1: float zeros
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
    return layer, dequantize_int4(qweight, scales, zeros, group_size)


@pytest.mark.parametrize("group_size", [32, 128])
def test_dequantized_int4pack_is_the_kernels_weight(group_size) -> None:
    layer, _ = _layer(192, 256, group_size)
    layer.finalize()
    assert layer.mode == "cpu" and layer.cpu_many_rows
    packed, scale_and_zero = layer.kernel_tensors
    weight = int4pack_cpu.dequantize_int4pack(packed, scale_and_zero, group_size, 256)
    # the kernel applied to the identity returns its own weight, transposed, in bf16
    kernel_weight = torch.ops.aten._weight_int4pack_mm_for_cpu(
        torch.eye(256, dtype=torch.bfloat16), packed, group_size, scale_and_zero)
    assert weight.shape == (256, 192) and weight.dtype == torch.bfloat16
    torch.testing.assert_close(weight.float(), kernel_weight.float(), rtol=2**-8, atol=1e-7)


def test_many_rows_match_the_kernel_and_the_float_weight() -> None:
    layer, reference = _layer(128, 512, 64)
    layer.finalize()
    x = torch.randn(int4pack_cpu.DEQUANT_MIN_ROWS + 3, 512, generator=torch.Generator().manual_seed(1))
    exact = x.double() @ reference.double().T
    many = layer(x.to(torch.bfloat16))
    few = torch.cat([layer(chunk) for chunk in x.to(torch.bfloat16).split(64)])  # the kernel
    for out in (many, few):
        assert out.shape == exact.shape and out.dtype == torch.bfloat16
        assert float((out.double() - exact).norm() / exact.norm()) < 1e-2
