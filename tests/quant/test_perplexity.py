"""Perplexity of the embedded SmolLM2 on our own prose (litedeploy/data/eval_prose.txt, 773 tokens)
under each served form, against float32 (the GGUF's weights dequantized, float32 compute).

Measured (2-core CPU VM): float32 24.53; as loaded by default (Q4_1 linears kept 4-bit, Q8_0 LM
head kept 8-bit, bfloat16 compute) +0.16%; our int8 weights +0.28%; KV int8 +0.21%; KV int4 +10.6%.
Bounds: int8 weights and KV int8 within 1%; the default 4-bit form within 2% (its 4-bit values are
the float32 model's own, only the compute dtype differs); KV int4 within 15% (per-token, per-head
asymmetric 4-bit codes over 64-dim heads cost this small model about a tenth of its perplexity).
"""

from __future__ import annotations

import random

import pytest

from litedeploy.bench import perplexity as ppl
from litedeploy.config import EngineConfig
from litedeploy.loader.default_model import ModelNotFoundError, default_model_path
from litedeploy.model_bundle import load_bundle

BOUNDS = {"as loaded (default)": 0.02, "int8 weights": 0.01, "float32 + KV int8": 0.01,
          "float32 + KV int4": 0.15}


@pytest.fixture(scope="module")
def results():
    try:
        default_model_path()
    except ModelNotFoundError as exc:
        pytest.skip(str(exc))
    return ppl.run_variants(None, ppl.default_text())


def test_the_model_reads_english(results):
    """The prose scores far better than the same tokens shuffled: the pipeline is a real LM."""
    float32 = results["perplexity"]["float32"]
    assert 5 < float32 < 60
    bundle = load_bundle(None, EngineConfig(device="cpu", dtype="float32", model_format="hf"))
    token_ids = bundle.tokenizer.encode(ppl.default_text())
    shuffled = token_ids[:1] + random.Random(0).sample(token_ids[1:], len(token_ids) - 1)
    assert ppl.perplexity(ppl._engine(bundle), shuffled) > 5 * float32


@pytest.mark.parametrize("variant", list(BOUNDS))
def test_quantized_forms_stay_close_to_float32(results, variant):
    relative = results["relative_to_float32"][variant]
    assert abs(relative) <= BOUNDS[variant], (
        f"{variant}: perplexity {results['perplexity'][variant]:.3f} is {100 * relative:+.2f}% "
        f"from float32 {results['perplexity']['float32']:.3f}")
