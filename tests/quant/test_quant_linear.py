"""Int8 / Int4 (AWQ) linears against float references on random inputs.

Bounds (relative Frobenius error of the output): the float32 dequantize path equals x @ W_deq
far under 1e-3; the CPU kernels run in bfloat16 (about 4e-3 alone); int8 per channel is about
1e-2 of the float weights; int4 per group of G (Gaussian weights) about 0.08 at G = 32,
0.105 at G = 128.
"""

from __future__ import annotations

import pytest
import torch

from litedeploy.layers.quant_linear import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    pack_awq,
    quantize_int4,
    quantize_int8,
)
from litedeploy.loader.awq import awq_to_rows


def rel_err(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual.float() - expected.float()).norm() / expected.float().norm()).item()


def _data(out_features=192, in_features=512, tokens=7, seed=0):
    gen = torch.Generator().manual_seed(seed)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    x = torch.randn(tokens, in_features, generator=gen)
    return weight, x


def _int8(weight, bias=None):
    layer = Int8Linear(weight.shape[1], weight.shape[0], bias is not None)
    q, scales = quantize_int8(weight)
    with torch.no_grad():
        layer.weight.copy_(q)
        layer.scales.copy_(scales)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def _int4(weight, group_size, bias=None):
    layer = Int4Linear(weight.shape[1], weight.shape[0], bias is not None, group_size)
    qweight, scales, zeros = quantize_int4(weight, group_size)
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
        if bias is not None:
            layer.bias.copy_(bias)
    return layer


def test_int8_linear_close_to_float_before_and_after_finalize():
    weight, x = _data()
    bias = torch.randn(weight.shape[0])
    layer = _int8(weight, bias)
    expected = x @ weight.T + bias
    dequant = layer(x)  # float32 dequantize path
    assert rel_err(dequant, x @ layer.dequantized().T + bias) < 1e-5
    assert rel_err(dequant, expected) < 1e-2
    layer.finalize()
    assert layer.mode == "cpu"  # torch 2.13 has _weight_int8pack_mm
    out = layer(x.view(1, 7, -1)).view(7, -1)  # any leading shape, like nn.Linear
    assert out.dtype == torch.float32
    assert rel_err(out, dequant) < 1e-2
    assert rel_err(out, expected) < 1.5e-2


@pytest.mark.parametrize(("group_size", "bound"), [(32, 0.09), (64, 0.1), (128, 0.12)])
def test_int4_linear_close_to_float(group_size, bound):
    weight, x = _data()
    layer = _int4(weight, group_size)
    expected = x @ weight.T
    reference = x @ layer.dequantized().T
    dequant = layer(x)
    assert rel_err(dequant, reference) < 1e-5
    err = rel_err(dequant, expected)
    assert 0.01 < err < bound  # it is quantized, and no worse than its group size allows
    layer.finalize()
    assert layer.mode == "cpu" and layer.qweight is None  # repacked, row form freed
    assert rel_err(layer(x), reference) < 1e-2  # bfloat16 activations only


def test_int4_cpu_kernel_handles_fractional_zero_points_and_bias():
    # GGUF Q4_1 zero points are not integers; the kernel folds them into its offsets
    weight, x = _data(out_features=64, in_features=256)
    layer = _int4(weight, 32, bias=torch.randn(64))
    with torch.no_grad():
        layer.zeros.add_(torch.rand(layer.zeros.shape) - 0.5)
    reference = layer(x)
    layer.finalize()
    assert rel_err(layer(x), reference) < 1e-2


def test_awq_tensors_load_into_int4_linear():
    """AWQ's on-disk packing -> our row form -> forward equals the AWQ dequantization."""
    gen = torch.Generator().manual_seed(3)
    in_features, out_features, group_size = 256, 96, 64
    q = torch.randint(0, 16, (in_features, out_features), generator=gen)  # [K, N]
    zeros = torch.randint(0, 16, (in_features // group_size, out_features), generator=gen)
    scales = (torch.rand(in_features // group_size, out_features, generator=gen) * 0.01)
    scales = scales.half()
    # the AWQ definition: w[k, n] = (q[k, n] - zero[k // G, n]) * scale[k // G, n]
    groups = torch.arange(in_features) // group_size
    w_kn = (q - zeros[groups]).float() * scales[groups].float()
    layer = Int4Linear(in_features, out_features, False, group_size)
    with torch.no_grad():
        for name, tensor in (("x.qweight", pack_awq(q)), ("x.qzeros", pack_awq(zeros)),
                             ("x.scales", scales)):
            ours_name, ours = awq_to_rows(name, tensor)
            getattr(layer, ours_name.split(".")[1]).copy_(ours)
    x = torch.randn(5, in_features, generator=gen)
    assert rel_err(layer(x), x @ w_kn) < 1e-5
    layer.finalize()
    assert rel_err(layer(x), x @ w_kn) < 1e-2


def test_round_trip_of_the_row_form():
    weight, _ = _data(out_features=16, in_features=128)
    qweight, scales, zeros = quantize_int4(weight, 32)
    assert qweight.dtype == torch.uint8 and qweight.shape == (16, 64)
    # every weight within half a quantization step of its original
    step = scales.repeat_interleave(32, dim=1)
    assert ((dequantize_int4(qweight, scales, zeros, 32) - weight).abs() <= step / 2 + 1e-6).all()


def test_group_size_must_divide_input_features():
    with pytest.raises(ValueError, match="group size"):
        Int4Linear(100, 8, False, 64)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("num_tokens", [1, 5, 17, 64, 100])
def test_triton_kernels_match_dequantized_reference(num_tokens):
    pytest.importorskip("triton")
    weight, x = _data(out_features=384, in_features=1024, tokens=num_tokens)
    x = x.cuda().half()
    for layer in (_int4(weight, 128), _int8(weight)):
        layer = layer.cuda()
        reference = x.float() @ layer.dequantized().T
        layer.finalize()
        assert layer.mode == "triton"
        assert rel_err(layer(x), reference) < 5e-3
