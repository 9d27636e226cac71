"""Structured output in the engine: grammar masks on the rows that carry one, on tiny models with
a byte-level BPE vocabulary (HF tokenizer) and a SentencePiece byte-fallback one (InternLM2)."""

from __future__ import annotations

import asyncio
import json
import re

import jsonschema
import pytest

from litedeploy.config import EngineConfig, GenerationConfig, GuidedDecoding
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.guided import compile_check
from litedeploy.errors import RequestError
from litedeploy.model_bundle import load_bundle
from tests.helpers import tiny_models

SCHEMA = {
    "type": "object",
    "properties": {
        "name": {"type": "string", "maxLength": 6},
        "count": {"type": "integer", "minimum": 0, "maximum": 99},
        "ok": {"type": "boolean"},
        "color": {"enum": ["red", "green", "blue"]},
        "tags": {"type": "array", "items": {"enum": ["a", "b"]}, "minItems": 1, "maxItems": 3},
    },
    "required": ["name", "count", "ok", "color", "tags"],
    "additionalProperties": False,
}
JSON_SCHEMA = GuidedDecoding("json_schema", json.dumps(SCHEMA))
PROMPTS = [[1, 20, 30, 40], [1, 50, 60], [1, 70, 80, 90, 100]]


def sampled(seed: int, guided: GuidedDecoding | None, max_new: int = 160) -> GenerationConfig:
    return GenerationConfig(max_new_tokens=max_new, do_sample=True, temperature=1.0, top_k=0,
                            random_seed=seed, guided=guided)


def _engine(folder, **overrides) -> LLMEngine:
    config = EngineConfig(dtype="float32", device="cpu", check_integrity=True, **overrides)
    return LLMEngine(load_bundle(str(folder), config), config)


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    """A byte-level BPE vocabulary (HF tokenizer.json), the kind GGUF files give too."""
    folder, _ = tiny_models.make_llama(tmp_path_factory.mktemp("m") / "bpe")
    return _engine(folder)


def test_json_schema_outputs_parse_and_validate(engine):
    for seed in range(2):
        outs = engine.generate(PROMPTS, sampled(seed, JSON_SCHEMA))
        for out in outs:
            assert out.finish_reason == "stop", out.text
            jsonschema.validate(json.loads(out.text), SCHEMA)
            # the grammar's end finishes the request: no stop token was needed or emitted
            assert not set(out.token_ids) & set(engine.bundle.stop_token_ids)


def test_sentencepiece_vocabulary_regex_choice_and_json_object(tmp_path):
    folder, _ = tiny_models.make_internlm2(tmp_path / "internlm2")
    sp_engine = _engine(folder)
    assert sp_engine.tokenizer.hf_tokenizer is None  # the SentencePiece backend
    regex = GuidedDecoding("regex", r"[a-z]{2,5}-[0-9]{2}")
    choice = GuidedDecoding("choice", json.dumps(["yes", "no", "maybe so"]))
    obj = GuidedDecoding("json_object")
    for seed in range(1):
        r, c, o = (sp_engine.generate([PROMPTS[0]], sampled(seed, g, 60))[0]
                   for g in (regex, choice, obj))
        assert re.fullmatch(r"[a-z]{2,5}-[0-9]{2}", r.text) and r.finish_reason == "stop"
        assert c.text in ("yes", "no", "maybe so") and c.finish_reason == "stop"
        if o.finish_reason == "stop":
            assert isinstance(json.loads(o.text), dict)
        else:  # a random model may write one long string: still a valid start of an object
            assert o.finish_reason == "length" and _is_valid_prefix(sp_engine, obj, o.token_ids)
    out = sp_engine.generate([PROMPTS[1]], sampled(5, JSON_SCHEMA))[0]
    jsonschema.validate(json.loads(out.text), SCHEMA)


def _is_valid_prefix(engine, guided: GuidedDecoding, token_ids: list[int]) -> bool:
    """A fresh matcher of the same grammar takes every token (the text can still be completed)."""
    matcher = engine.grammars.get(guided).deep_copy()
    return matcher.consume_tokens(token_ids) and not matcher.is_error()


def test_max_tokens_cut_is_length_and_a_valid_prefix(engine):
    out = engine.generate([PROMPTS[1]], sampled(7, JSON_SCHEMA, max_new=9))[0]
    assert out.finish_reason == "length" and len(out.token_ids) == 9
    assert out.text.startswith("{") and _is_valid_prefix(engine, JSON_SCHEMA, out.token_ids)
    with pytest.raises(json.JSONDecodeError):
        json.loads(out.text)


def test_unconstrained_rows_in_the_same_batch_are_untouched(engine):
    plain = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    alone = engine.generate([PROMPTS[2]], plain)[0]
    engine.add_request("guided-0", PROMPTS[0], sampled(1, JSON_SCHEMA))
    engine.add_request("guided-1", PROMPTS[1], GenerationConfig(max_new_tokens=40,
                                                                guided=JSON_SCHEMA))
    mixed = engine.generate([PROMPTS[2]], plain)[0]
    while engine.has_unfinished():
        engine.step()
    assert mixed.token_ids == alone.token_ids


def test_multi_step_bursts_skip_grammar_rows(engine):
    config = EngineConfig(dtype="float32", device="cpu", num_scheduler_steps=4,
                          check_integrity=True)
    burst_engine = LLMEngine(engine.bundle, config)
    plain = burst_engine.generate(PROMPTS[:1], GenerationConfig(max_new_tokens=9,
                                                                 ignore_eos=True))
    assert burst_engine.num_burst_steps > 0 and len(plain[0].token_ids) == 9
    burst_engine.num_burst_steps = 0
    greedy = GenerationConfig(max_new_tokens=160, guided=JSON_SCHEMA)
    outs = burst_engine.generate(PROMPTS, greedy)
    assert burst_engine.num_burst_steps == 0  # every row has a grammar: no burst ran
    assert [o.token_ids for o in outs] == [o.token_ids for o in engine.generate(PROMPTS, greedy)]
    for out in outs:
        jsonschema.validate(json.loads(out.text), SCHEMA)


@pytest.mark.parametrize("guided, reason", [
    (GuidedDecoding("json_schema", '{"type": "no-such-type"}'), "no-such-type"),
    (GuidedDecoding("json_schema", "{not json"), "not valid JSON"),
    (GuidedDecoding("regex", "(ab"), "unclosed group"),
    (GuidedDecoding("regex", r"[^\s\S]"), "matches no text"),
    (GuidedDecoding("choice", "[]"), "non-empty list"),
    (GuidedDecoding("grammar", "root ::= undefined_rule"), "undefined_rule"),
])
def test_bad_constraints_are_request_errors_with_the_reason(engine, guided, reason):
    with pytest.raises(RequestError, match=re.escape(reason)):
        engine.add_request("bad", PROMPTS[0], GenerationConfig(guided=guided))
    with pytest.raises(RequestError, match=re.escape(reason)):
        compile_check(engine.tokenizer, guided)
    assert not engine.has_unfinished()
    engine.scheduler.check_integrity()


def test_async_engine_compiles_off_the_step_thread_and_rejects_before_queuing(engine):
    async def run() -> tuple[str, str]:
        async_engine = AsyncEngine(engine)
        try:
            with pytest.raises(RequestError, match="Invalid type"):
                async for _ in async_engine.generate(
                        None, GenerationConfig(guided=GuidedDecoding("json_schema",
                                                                     '{"type": "x"}')),
                        input_ids=PROMPTS[0]):
                    pass
            text, reason = "", None
            async for out in async_engine.generate(None, sampled(3, JSON_SCHEMA),
                                                   input_ids=PROMPTS[0]):
                text += out.text
                reason = out.finish_reason
            return text, reason
        finally:
            async_engine.close()

    text, reason = asyncio.run(run())
    assert reason == "stop"
    jsonschema.validate(json.loads(text), SCHEMA)


def test_pipeline_response_format(engine):
    from pydantic import BaseModel, Field

    from litedeploy.api import Pipeline

    class Item(BaseModel):
        label: str = Field(max_length=5)
        ok: bool

    pipe = Pipeline(engine)
    gen = GenerationConfig(max_new_tokens=60)
    reply = pipe("Name an item.", gen, response_format=Item)
    assert reply.finish_reason == "stop" and Item.model_validate_json(reply.text)
    session = pipe.chat("Another one.", gen_config=gen,
                        response_format={"type": "json_schema",
                                         "json_schema": {"name": "item",
                                                         "schema": Item.model_json_schema()}})
    Item.model_validate_json(session.response.text)
    with pytest.raises(ValueError, match="not supported"):
        pipe("x", gen, response_format={"type": "yaml"})


def test_logprobs_stay_raw_under_a_grammar(engine):
    """Masking must not touch the logits that logprobs are read from (vLLM's raw logprobs)."""
    plain = GenerationConfig(max_new_tokens=1, logprobs=5, ignore_eos=True)
    guided = GenerationConfig(max_new_tokens=1, logprobs=5, guided=JSON_SCHEMA)
    free, masked = (engine.generate([PROMPTS[0]], gen)[0] for gen in (plain, guided))
    assert masked.text == "{"
    assert masked.logprobs[0].top_logprobs == free.logprobs[0].top_logprobs
