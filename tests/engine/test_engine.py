"""The serving engine reproduces the reference path token for token under every scheduling regime."""

from __future__ import annotations

import asyncio

import pytest

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.engine import LLMEngine
from litedeploy.errors import RequestError
from litedeploy.model_bundle import load_bundle
from litedeploy.reference_generation import generate
from tests.helpers import tiny_models

MAX_NEW = 24


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder, _ = tiny_models.make_internlm2(tmp_path_factory.mktemp("m") / "internlm2")
    return load_bundle(str(folder), EngineConfig(dtype="float32", device="cpu"))


def _prompts() -> list[list[int]]:
    shared = [1] + [(7 * j) % 250 + 20 for j in range(45)]  # a long shared prefix (> 10 blocks)
    prompts = []
    for i in range(16):
        if i % 3 == 0:
            prompts.append(shared + [(i * 11 + j) % 250 + 20 for j in range(i % 5 + 1)])
        else:
            prompts.append([1] + [(i * 13 + j * 3) % 250 + 20 for j in range(3 + 4 * i)])
    return prompts


@pytest.fixture(scope="module")
def references(bundle):
    """Each prompt generated alone by the reference path; every 4th one gets a stop string."""
    plain = GenerationConfig(max_new_tokens=MAX_NEW, ignore_eos=True)
    cases = []
    for i, prompt in enumerate(_prompts()):
        gen = plain
        if i % 4 == 1:
            text = generate(bundle.model, [prompt], plain, tokenizer=bundle.tokenizer)[0].text
            stop = text[len(text) // 2: len(text) // 2 + 2]
            if stop.strip():
                gen = GenerationConfig(max_new_tokens=MAX_NEW, ignore_eos=True, stop_words=[stop])
        ref = generate(bundle.model, [prompt], gen, tokenizer=bundle.tokenizer)[0]
        cases.append((prompt, gen, ref))
    assert any(ref.finish_reason == "stop" for _, _, ref in cases)
    return cases


REGIMES = {
    "plain": dict(),
    "prefix-caching": dict(enable_prefix_caching=True),
    "preemption": dict(cache_max_tokens=160),
    "preemption+prefix": dict(cache_max_tokens=160, enable_prefix_caching=True),
    "chunked-prefill": dict(max_prefill_token_num=7),
    "chunked+prefix": dict(max_prefill_token_num=10, enable_prefix_caching=True),
    # greedy bursts of decode steps between host syncs (engine/multi_step.py)
    "multi-step": dict(num_scheduler_steps=4),
    "multi-step+preemption+prefix": dict(num_scheduler_steps=5, cache_max_tokens=160,
                                         enable_prefix_caching=True),
    # over half full: admissions gather for prefill_interval steps while bursts run
    "multi-step+busy-batch": dict(num_scheduler_steps=4, max_batch_size=4, prefill_interval=3),
}


@pytest.mark.parametrize("regime", list(REGIMES))
def test_batch_equals_reference_alone(bundle, references, regime):
    config = EngineConfig(cache_block_seq_len=4, check_integrity=True,
                          **{"cache_max_tokens": 4096, **REGIMES[regime]})
    engine = LLMEngine(bundle, config)
    results = {f"r{i}": {"ids": [], "text": "", "reason": None} for i in range(len(references))}
    pending = [(f"r{i}", prompt, gen) for i, (prompt, gen, _) in enumerate(references)]
    engine.add_request(*pending.pop(0))  # the first one runs ahead, so later ones can hit its prefix
    while engine.has_unfinished() or pending:
        step_outputs = engine.step()
        for request in pending:
            engine.add_request(*request)
        pending = []
        for out in step_outputs:
            results[out.request_id]["ids"] += out.token_ids
            results[out.request_id]["text"] += out.text
            results[out.request_id]["reason"] = out.finish_reason
        engine.scheduler.check_integrity()
    for i, (_, _, ref) in enumerate(references):
        got = results[f"r{i}"]
        assert got["ids"] == ref.token_ids, f"request {i}"
        assert got["reason"] == ref.finish_reason
        assert got["text"] == ref.text
    bm = engine.block_manager
    assert bm.num_free_blocks == bm.num_blocks  # nothing leaked
    if regime.startswith("preemption"):
        assert engine.num_preemptions > 0
    if "prefix" in regime:
        assert bm.stats.num_prefix_hit_tokens > 0
    assert (engine.num_burst_steps > 0) == regime.startswith("multi-step")


def test_a_full_batch_bursts_while_requests_wait(bundle):
    """Nobody can enter a full batch before a sequence finishes, so a due admission does not cut
    its multi-step bursts to single steps."""
    engine = LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=4096,
                                            max_batch_size=2, num_scheduler_steps=4,
                                            prefill_interval=1))
    gen = GenerationConfig(max_new_tokens=9, ignore_eos=True)
    for i in range(3):
        engine.add_request(f"r{i}", [1, 20 + i, 30, 40], gen)
    engine.step()  # the first two prompts: the batch is full, the third waits
    assert engine.scheduler.is_full and engine.scheduler.num_waiting == 1
    engine.step()
    assert engine.num_burst_steps == 4


def test_request_that_can_never_fit_is_rejected(bundle):
    engine = LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=64,
                                            session_len=128))
    with pytest.raises(RequestError, match="128"):
        engine.add_request("long", [1] * 100, GenerationConfig(max_new_tokens=64))
    with pytest.raises(RequestError):
        engine.add_request("big", [1] * 60, GenerationConfig(max_new_tokens=30))
    with pytest.raises(RequestError):
        engine.add_request("empty", [], GenerationConfig())
    assert not engine.has_unfinished()


def test_seeded_sampling_reproducible_across_batches(bundle):
    engine = LLMEngine(bundle, EngineConfig(cache_max_tokens=4096, cache_block_seq_len=4))
    sampled = GenerationConfig(max_new_tokens=16, do_sample=True, temperature=1.0, top_k=0,
                               random_seed=1234, ignore_eos=True)
    prompt = _prompts()[2]
    alone = engine.generate([prompt], sampled)[0].token_ids
    others = [_prompts()[5], _prompts()[7]]
    mixed = engine.generate([others[0], prompt, others[1]],
                            GenerationConfig(max_new_tokens=16, ignore_eos=True))
    mixed_outputs = []
    for i, p in enumerate([others[0], prompt, others[1]]):
        engine.add_request(f"m{i}", p, sampled if i == 1 else GenerationConfig(
            max_new_tokens=9, do_sample=True, random_seed=i, ignore_eos=True))
    while engine.has_unfinished():
        mixed_outputs += [o for o in engine.step() if o.request_id == "m1"]
    assert [t for o in mixed_outputs for t in o.token_ids] == alone
    other_seed = GenerationConfig(**{**sampled.__dict__, "random_seed": 99})
    assert engine.generate([prompt], other_seed)[0].token_ids != alone
    assert mixed  # the greedy batch ran alongside without error


def test_abort_mid_stream_frees_blocks(bundle):
    async def scenario():
        engine = AsyncEngine(LLMEngine(bundle, EngineConfig(cache_max_tokens=4096,
                                                            cache_block_seq_len=4)))
        bm = engine.engine.block_manager
        free_at_start = bm.num_free_blocks
        gen = GenerationConfig(max_new_tokens=200, ignore_eos=True)
        received = 0
        async for _ in engine.generate(None, gen, input_ids=_prompts()[3]):
            received += 1
            if received == 3:
                break
        for _ in range(100):
            if not engine.engine.has_unfinished():
                break
            await asyncio.sleep(0.02)
        engine.close()
        engine.engine.scheduler.check_integrity()
        return received, free_at_start, bm.num_free_blocks

    received, before, after = asyncio.run(scenario())
    assert received == 3
    assert after == before
