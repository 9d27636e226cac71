"""bf16 copies of the quantized weights for CPU steps of many rows (layers/cpu_batched_weights.py).

Steps of BATCHED_MIN_ROWS rows or more multiply by the bf16 copy, fewer rows keep the packed
int4/int8 kernels; the copies exist only where the engine batches and while they fit the budget.
Against the float64 product of the dequantized weight both routes stay within 1e-2 (relative
norm; bf16 activations and outputs, ~3e-3 measured). The compiled CPU decode then splits its
batched graph in two ranges (2..7 rows, 8 or more) and serves both without recompiling; its
greedy runs agree with the eager engine's up to near ties (bf16 matmuls: no exact tokens).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.cpu_compile_cache import compiled_decode_of, torch_compiles_in_background
from litedeploy.engine.engine import LLMEngine
from litedeploy.layers import cpu_batched_weights, int4pack_cpu
from litedeploy.layers.cpu_batched_weights import BATCHED_MIN_ROWS, attach_bf16_copies
from litedeploy.layers.quant_linear import (
    Int4Linear,
    Int8Linear,
    dequantize_int4,
    quantize_int4,
    quantize_int8,
)
from litedeploy.loader.quantization import quantize_linears
from litedeploy.model_bundle import load_bundle
from tests.helpers.teacher_forcing import assert_greedy_agrees_up_to_near_ties
from tests.helpers.tiny_models import make_llama

_INT4_MM = torch.ops.aten._weight_int4pack_mm_for_cpu
_INT8_MM = torch.ops.aten._weight_int8pack_mm


def _int4_layer(out_features: int = 128, in_features: int = 256) -> tuple[Int4Linear, torch.Tensor]:
    gen = torch.Generator().manual_seed(0)
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    layer = Int4Linear(in_features, out_features, group_size=32)
    qweight, scales, zeros = quantize_int4(weight, 32)
    with torch.no_grad():
        layer.qweight.copy_(qweight)
        layer.scales.copy_(scales)
        layer.zeros.copy_(zeros)
    reference = dequantize_int4(qweight, scales, zeros, 32)
    layer.finalize()
    return layer, reference


def _int8_layer(out_features: int = 96, in_features: int = 128) -> tuple[Int8Linear, torch.Tensor]:
    weight = torch.randn(out_features, in_features, generator=torch.Generator().manual_seed(0))
    layer = Int8Linear(in_features, out_features)
    codes, scales = quantize_int8(weight)
    with torch.no_grad():
        layer.weight.copy_(codes)
        layer.scales.copy_(scales)
    layer.finalize()
    return layer, layer.dequantized()


def _close_to(out: torch.Tensor, x: torch.Tensor, reference: torch.Tensor) -> bool:
    exact = x.double() @ reference.double().T
    return float((out.double() - exact).norm() / exact.norm()) < 1e-2


@pytest.mark.skipif(not int4pack_cpu.int4pack_layout_known(), reason="no int4pack kernel here")
def test_int4_many_rows_take_the_copy_few_rows_the_kernel() -> None:
    layer, reference = _int4_layer()
    assert layer.mode == "cpu" and layer.can_keep_bf16_copy()
    layer.keep_bf16_copy()
    packed, scale_and_zero = layer.kernel_tensors
    gen = torch.Generator().manual_seed(1)
    for rows in (1, BATCHED_MIN_ROWS - 1, BATCHED_MIN_ROWS, 40):
        x = torch.randn(rows, 256, generator=gen).to(torch.bfloat16)
        out = layer(x)
        if rows >= BATCHED_MIN_ROWS:
            assert torch.equal(out, x @ layer.bf16_copy)
        else:
            assert torch.equal(out, _INT4_MM(x, packed, 32, scale_and_zero))
        assert _close_to(out, x, reference)


def test_int8_many_rows_take_the_copy_few_rows_the_kernel() -> None:
    layer, reference = _int8_layer()
    layer.keep_bf16_copy()
    assert layer.bf16_copy.shape == (96, 128) and layer.bf16_copy.dtype == torch.bfloat16
    gen = torch.Generator().manual_seed(1)
    for rows in (1, BATCHED_MIN_ROWS - 1, BATCHED_MIN_ROWS, 40):
        x = torch.randn(rows, 128, generator=gen).to(torch.bfloat16)
        out = layer(x)
        if rows >= BATCHED_MIN_ROWS:
            assert torch.equal(out, F.linear(x, layer.bf16_copy))
        else:
            assert torch.equal(out, _INT8_MM(x, layer.weight, layer.scales_bf16))
        assert _close_to(out, x, reference)


@pytest.fixture(scope="module")
def int8_bundle(tmp_path_factory):
    """The tiny Llama with every decoder linear int8 (quantize-on-load), float32 elsewhere."""
    folder, _ = make_llama(tmp_path_factory.mktemp("llama"))
    bundle = load_bundle(str(folder), EngineConfig(device="cpu", dtype="float32"))
    assert quantize_linears(bundle.model) == 2 * 4  # 2 layers: qkv, o, gate_up, down
    return bundle


def _linears(model) -> list[Int8Linear]:
    return [m for m in model.modules() if isinstance(m, Int8Linear)]


def test_copies_only_where_the_engine_batches_and_within_the_budget(int8_bundle,
                                                                     monkeypatch) -> None:
    model = int8_bundle.model
    for module in _linears(model):
        module.bf16_copy = None
    assert attach_bf16_copies(model, max_batch_size=1) == 0  # litedeploy chat: none
    monkeypatch.setenv(cpu_batched_weights.BUDGET_ENV, "0")
    assert attach_bf16_copies(model, max_batch_size=32) == 0
    assert all(m.bf16_copy is None for m in _linears(model))
    monkeypatch.setenv(cpu_batched_weights.BUDGET_ENV, "bogus")  # a warning, the default budget
    taken = attach_bf16_copies(model, max_batch_size=32)
    assert taken == sum(2 * m.in_features * m.out_features for m in _linears(model)) > 0
    assert all(m.bf16_copy is not None for m in _linears(model))
    engine = LLMEngine(int8_bundle, EngineConfig(cache_max_tokens=256, max_batch_size=16,
                                                 eager_mode=True))
    assert engine.bf16_copy_bytes == taken


PROMPTS = [[1] + [(i * 13 + j * 7) % 250 + 20 for j in range(3 + (i % 5))] for i in range(10)]
GEN = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=2)


@pytest.mark.skipif(not torch_compiles_in_background(),
                    reason=f"torch {torch.__version__}: no background compile (engine keeps it off)")
def test_compiled_decode_splits_few_and_many_rows(int8_bundle, tmp_path, monkeypatch) -> None:
    monkeypatch.setenv("LITEDEPLOY_CPU_COMPILE", "1")
    monkeypatch.setenv("LITEDEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
    settings = {"cache_block_seq_len": 4, "cache_max_tokens": 1024, "max_batch_size": 16}
    eager = LLMEngine(int8_bundle, EngineConfig(eager_mode=True, **settings))
    engine = LLMEngine(int8_bundle, EngineConfig(**settings))
    graphs = compiled_decode_of(engine)
    assert graphs.split_rows
    assert graphs.wait(900) == "on", graphs.off_reason
    for count in (3, BATCHED_MIN_ROWS + 2):  # one graph each, no recompile
        before = graphs.num_runs
        got = [out.logprobs for out in engine.generate(PROMPTS[:count], GEN)]
        assert graphs.num_runs - before == GEN.max_new_tokens - 1
        expected = [out.logprobs for out in eager.generate(PROMPTS[:count], GEN)]
        for ours, reference in zip(got, expected, strict=True):
            assert_greedy_agrees_up_to_near_ties(ours, reference, atol=2e-2)
    assert graphs.status == "on"
