"""The torch.compile'd batch-1 CPU decode step against the eager engine, on a dummy int4 model
(int4 linears in the graph, float LM head): same tokens and logprobs, over block boundaries and
a KV cache full of NaN bits past the context; batches and bursts fall back to the eager path.

The int4 kernels take bfloat16 activations, and Inductor's fused loops round in another order
than eager's ops (which order depends on the CPU's vector width), so a float32 difference of one
ulp can flip a bfloat16 rounding: logprobs agree within 2e-3, not bit for bit, and the two greedy
runs may part at a step where the eager run's top two logprobs are within that tolerance (a near
tie); every step before it must match. Measured with AVX-512, AVX2 and scalar kernels: same
tokens, logprobs within 4.2e-4, while this random model's top two are often under 0.006 apart."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.cpu_compiled_decode import CompiledCPUDecode, enable_compiled_cpu_decode
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.sampler import SampledToken
from litedeploy.layers.quant_linear import Int4Linear
from litedeploy.model_bundle import load_bundle
from tests.helpers.teacher_forcing import assert_greedy_agrees_up_to_near_ties
from tests.helpers.tiny_models import TINY

PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13]]
# crosses 4-token blocks; the top two logprobs show near ties
GEN = GenerationConfig(max_new_tokens=14, ignore_eos=True, logprobs=2)
LOGPROB_ATOL = 2e-3


@pytest.fixture(scope="module", autouse=True)
def empty_inductor_cache():
    """Compile into an empty Inductor cache. Its keys leave out ATEN_CPU_CAPABILITY: after a run
    under AVX-512, a run under ATEN_CPU_CAPABILITY=avx2 loaded the cached kernels and computed
    garbage (a plain compiled sum off by 20, NaN logprobs here), which is PyTorch's, not ours."""
    from torch._inductor.utils import fresh_cache

    with fresh_cache():
        yield


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder = Path(tmp_path_factory.mktemp("int4"))
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY,
              "hidden_size": 128, "intermediate_size": 256, "rope_theta": 10000.0,
              "tie_word_embeddings": False}
    (folder / "config.json").write_text(json.dumps(config))
    engine_config = EngineConfig(device="cpu", dtype="float32", load_format="dummy",
                                 model_format="awq")
    return load_bundle(str(folder), engine_config)


def _engine(bundle) -> LLMEngine:
    return LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=256))


def _generate(engine: LLMEngine, prompts: list[list[int]], gen=GEN) -> list[list[SampledToken]]:
    """Each request's sampled tokens with their logprobs; all requests submitted at once."""
    for i, prompt in enumerate(prompts):
        engine.add_request(f"r{i}", prompt, gen)
    tokens: dict[str, list[SampledToken]] = {f"r{i}": [] for i in range(len(prompts))}
    while engine.has_unfinished():
        for out in engine.step():
            tokens[out.request_id] += out.logprobs
    return [tokens[f"r{i}"] for i in range(len(prompts))]


@pytest.fixture(scope="module")
def compiled_engine(bundle):
    engine = _engine(bundle)
    compiled = enable_compiled_cpu_decode(engine)
    # slots past every context: NaN bits that the eager path never lets through either
    for cache in (*engine.kv_cache.k_caches, *engine.kv_cache.v_caches):
        cache.fill_(math.nan)
    calls = {"n": 0}
    run = compiled.run

    def counted(host):
        calls["n"] += 1
        return run(host)

    compiled.run = counted
    return engine, calls


def _assert_same(got: list[SampledToken], expected: list[SampledToken]) -> None:
    assert_greedy_agrees_up_to_near_ties(got, expected, atol=LOGPROB_ATOL)


def test_the_graph_holds_the_int4_kernels(bundle):
    assert isinstance(bundle.model.model.layers[0].mlp.down_proj, Int4Linear)
    assert bundle.model.model.layers[0].mlp.down_proj.mode == "cpu"


def test_single_sequence_decode_matches_the_eager_engine(bundle, compiled_engine):
    engine, calls = compiled_engine
    expected = _generate(_engine(bundle), PROMPTS[:1])
    before = calls["n"]
    got = _generate(engine, PROMPTS[:1])
    assert calls["n"] - before == GEN.max_new_tokens - 1  # every decode step went compiled
    _assert_same(got[0], expected[0])
    assert all(math.isfinite(t.logprob) for t in got[0])


def test_a_one_block_context_uses_the_specialized_graph(bundle, compiled_engine):
    engine, _ = compiled_engine
    short = GenerationConfig(max_new_tokens=2, ignore_eos=True, logprobs=0)
    expected = _generate(_engine(bundle), [[9]], short)  # context of 2 tokens: one block
    _assert_same(_generate(engine, [[9]], short)[0], expected[0])


def test_batches_fall_back_to_the_eager_path(bundle, compiled_engine):
    engine, calls = compiled_engine
    expected = _generate(_engine(bundle), PROMPTS)
    before = calls["n"]
    got = _generate(engine, PROMPTS)
    assert calls["n"] == before  # same lengths: every decode step had both sequences
    for ours, theirs in zip(got, expected):
        _assert_same(ours, theirs)


def test_refuses_what_it_cannot_serve(bundle):
    engine = _engine(bundle)
    engine.add_request("busy", PROMPTS[0], GEN)
    with pytest.raises(ValueError, match="before adding requests"):
        enable_compiled_cpu_decode(engine)
    quantized_cache = LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=256,
                                                     quant_policy=8))
    with pytest.raises(ValueError, match="float KV cache"):
        CompiledCPUDecode(bundle.model, quantized_cache.kv_cache, quantized_cache.runner.scale)
