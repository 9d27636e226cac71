"""Prompt logprobs and logit_bias in the serving engine, against transformers in float32."""

from __future__ import annotations

import pytest
import torch

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine import prompt_logprobs
from litedeploy.engine.engine import LLMEngine
from litedeploy.errors import RequestError
from tests.helpers import tiny_models

NUM_TOP = 3
# 70 tokens: more than one 16-token block, so a prefix-cache hit would skip whole blocks
PROMPT = [1] + [(13 * j + 5) % 290 + 3 for j in range(69)]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    folder, hf_model = tiny_models.make_llama(tmp_path_factory.mktemp("m") / "llama")
    with torch.inference_mode():
        logits = hf_model(torch.tensor([PROMPT])).logits[0].float()
    return str(folder), logits.log_softmax(dim=-1)  # [len, vocab]: position i predicts i + 1


def _engine(folder: str, **overrides) -> LLMEngine:
    settings = {"cache_max_tokens": 1024, **overrides}
    config = EngineConfig(dtype="float32", device="cpu", cache_block_seq_len=16,
                          check_integrity=True, **settings)
    return LLMEngine.from_pretrained(folder, config)


def _assert_matches(entries, expected: torch.Tensor) -> None:
    assert len(entries) == len(PROMPT) and entries[0] is None
    for position, entry in enumerate(entries[1:], start=1):
        row = expected[position - 1]
        assert entry.token_id == PROMPT[position]
        assert entry.logprob == pytest.approx(row[PROMPT[position]].item(), abs=1e-4)
        assert entry.rank == int((row > row[PROMPT[position]]).sum()) + 1
        top_values, top_ids = row.topk(NUM_TOP)
        assert [i for i, _ in entry.top_logprobs] == top_ids.tolist()
        assert [v for _, v in entry.top_logprobs] == pytest.approx(top_values.tolist(), abs=1e-4)


@pytest.mark.parametrize("regime", [
    {},
    {"max_prefill_token_num": 7},  # chunked prefill: positions accumulate over 10 steps
    {"enable_prefix_caching": True},  # a warm prefix cache must not skip positions
])
def test_prompt_logprobs_equal_transformers_log_softmax(tiny, regime, monkeypatch):
    folder, expected = tiny
    # 3 rows per LM-head chunk: a 69-row prompt goes through 23 chunks
    monkeypatch.setattr(prompt_logprobs, "LOGIT_CHUNK_BYTES", 3 * 4 * tiny_models.VOCAB)
    engine = _engine(folder, **regime)
    plain = GenerationConfig(max_new_tokens=2, ignore_eos=True)
    if regime.get("enable_prefix_caching"):
        engine.generate([PROMPT], plain)  # fills the cache with this prompt's blocks
    gen = GenerationConfig(max_new_tokens=2, ignore_eos=True, prompt_logprobs=NUM_TOP)
    out = engine.generate([PROMPT], gen)[0]
    _assert_matches(out.prompt_logprobs, expected)
    assert out.num_cached_tokens == 0 and len(out.token_ids) == 2
    # the greedy tokens are the ones without prompt logprobs (the LM-head rows changed nothing)
    assert out.token_ids == engine.generate([PROMPT], plain)[0].token_ids
    if regime.get("enable_prefix_caching"):  # a plain request still hits the cache
        assert engine.generate([PROMPT], plain)[0].num_cached_tokens > 0


def test_max_new_tokens_zero_prefills_only_and_batches_with_others(tiny):
    folder, expected = tiny
    engine = _engine(folder)
    prompt_only = GenerationConfig(max_new_tokens=0, prompt_logprobs=NUM_TOP)
    engine.add_request("echo", PROMPT, prompt_only)
    engine.add_request("other", PROMPT[:9], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    outputs = {}
    while engine.has_unfinished():
        for out in engine.step():
            outputs.setdefault(out.request_id, []).append(out)
    echo = outputs["echo"]
    assert len(echo) == 1 and echo[0].finished and echo[0].finish_reason == "length"
    assert echo[0].token_ids == [] and echo[0].generate_token_len == 0
    _assert_matches(echo[0].prompt_logprobs, expected)
    assert all(out.prompt_logprobs is None for out in outputs["other"])
    assert sum(len(out.token_ids) for out in outputs["other"]) == 4
    with pytest.raises(ValueError, match="max_new_tokens"):  # 0 only with prompt logprobs
        engine.add_request("bad", PROMPT, GenerationConfig(max_new_tokens=0))


def test_logit_bias_steers_greedy_tokens_and_ids_are_validated(tiny):
    folder, _ = tiny
    engine = _engine(folder)
    plain = GenerationConfig(max_new_tokens=4, ignore_eos=True)
    natural = engine.generate([PROMPT[:12]], plain)[0].token_ids
    target = next(t for t in range(3, 300) if t not in natural)
    biased = GenerationConfig(max_new_tokens=4, ignore_eos=True, logit_bias={target: 100.0})
    assert engine.generate([PROMPT[:12]], biased)[0].token_ids == [target] * 4
    banned = GenerationConfig(max_new_tokens=4, ignore_eos=True,
                              logit_bias={natural[0]: -100.0})
    assert engine.generate([PROMPT[:12]], banned)[0].token_ids[0] != natural[0]
    with pytest.raises(RequestError, match="logit_bias"):
        engine.add_request("x", PROMPT, GenerationConfig(logit_bias={tiny_models.VOCAB: 1.0}))


def test_preempted_requests_keep_one_copy_of_their_prompt_logprobs(tiny):
    folder, expected = tiny
    # 7 blocks of 16 tokens: two 70-token prompts growing to 90 tokens cannot both stay
    engine = _engine(folder, cache_max_tokens=112, max_prefill_token_num=16)
    gen = GenerationConfig(max_new_tokens=20, ignore_eos=True, prompt_logprobs=NUM_TOP)
    outputs = engine.generate([PROMPT, PROMPT], gen)
    assert engine.num_preemptions > 0
    for out in outputs:
        _assert_matches(out.prompt_logprobs, expected)
        assert len(out.token_ids) == 20
