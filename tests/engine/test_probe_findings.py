"""Engine-side findings of a hostile probe of the server: KV blocks reused most-recent-first (so a
CPU cache's resident memory stays at the working set), a CPU cache sized for what it can hold,
temperatures so small that float32 cannot divide by them, and closing while a step runs."""

from __future__ import annotations

import asyncio
import itertools
import threading
import time
from types import SimpleNamespace

import pytest
import torch

from litedeploy.config import CacheConfig, EngineConfig, GenerationConfig
from litedeploy.engine import kv_cache
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.block_manager import BlockManager
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.sampler import Sampler, SamplingRow
from litedeploy.engine.sequence import Sequence
from litedeploy.model_bundle import load_bundle
from tests.helpers import tiny_models

_seq_ids = itertools.count()


def _seq(num_tokens: int) -> Sequence:
    return Sequence(next(_seq_ids), list(range(num_tokens)), num_tokens, max_new_tokens=4)


def test_freed_blocks_are_reused_most_recent_first() -> None:
    """A FIFO free list walks every block of the cache (touching every page of a lazily mapped
    CPU cache); the most recently freed block must be the next one handed out."""
    bm = BlockManager(num_blocks=64, block_size=4)
    used: set[int] = set()
    for _ in range(40):  # sequential requests of 2 blocks each
        seq = _seq(6)
        bm.allocate(seq, 6)
        used.update(seq.block_table)
        bm.free(seq)
        bm.check_integrity()
    assert used == {0, 1}
    first, second = _seq(6), _seq(6)  # two at once still take the lowest blocks, in order
    bm.allocate(first, 6)
    bm.allocate(second, 6)
    assert first.block_table == [0, 1] and second.block_table == [2, 3]


def test_cached_blocks_stay_evictable_while_free_ones_are_reused() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    cached = Sequence(next(_seq_ids), [7] * 9, 9, max_new_tokens=4)
    bm.match_prefix(cached)
    bm.allocate(cached, 9)
    cached.num_computed_tokens = 9
    bm.commit(cached)
    cached_blocks = cached.block_table[:2]  # the two full blocks are registered
    bm.free(cached)
    for _ in range(10):  # other traffic reuses the one free block, never the cached ones
        seq = _seq(3)
        bm.match_prefix(seq)
        bm.allocate(seq, 3)
        assert not set(seq.block_table) & set(cached_blocks)
        bm.free(seq)
    probe = Sequence(next(_seq_ids), [7] * 9, 9, max_new_tokens=4)
    bm.match_prefix(probe)
    assert probe.block_table == cached_blocks
    bm.free(probe)
    bm.check_integrity()


def test_cpu_cache_default_is_capped(monkeypatch) -> None:
    """80% of a large machine's RAM is far more than a CPU engine can use; the default stops at
    4 GiB, --cache-max-tokens still sets any size, and max_useful_tokens bounds it."""
    monkeypatch.setattr(kv_cache, "available_memory_bytes", lambda device: 2**36)  # 64 GiB
    model = SimpleNamespace(num_layers=30, num_kv_heads=3, head_dim=64)
    cpu = torch.device("cpu")
    shape = kv_cache.plan_cache(model, CacheConfig(), torch.float32, cpu, 10**9)
    assert 3.9 < shape.size_gib <= 4.0  # not 0.8 x 64 GiB
    bounded = kv_cache.plan_cache(model, CacheConfig(), torch.float32, cpu, 4 * 8192)
    assert bounded.num_tokens == 4 * 8192
    explicit = kv_cache.plan_cache(model, CacheConfig(max_cache_tokens=10**6), torch.float32,
                                   cpu, 10**9)
    assert explicit.num_tokens == 10**6


@pytest.mark.parametrize("temperature", [1e-300, 1e-40, 1e-8])
def test_tiny_temperature_is_greedy(temperature: float) -> None:
    """1e-300 is 0 in float32 (logits / 0 = nan -> token 0); 1e-40 overflows the division."""
    logits = torch.randn(3, 1000, generator=torch.Generator().manual_seed(0)) * 5
    rows = [SamplingRow(greedy=False, temperature=temperature, top_k=40, seed=s)
            for s in (None, 1, 2)]
    tokens = [t.token_id for t in Sampler("cpu")(logits, rows)]
    assert tokens == logits.argmax(dim=-1).tolist()
    assert all(row.is_greedy for row in rows)
    assert GenerationConfig(do_sample=True, temperature=temperature).is_greedy


def test_small_but_usable_temperature_still_samples() -> None:
    row = SamplingRow(greedy=False, temperature=0.01, seed=3)
    assert not row.is_greedy
    assert not GenerationConfig(do_sample=True, temperature=0.01).is_greedy


def test_close_waits_for_the_step_in_progress(tmp_path) -> None:
    """A process that exits while the engine thread is inside a step aborts in torch; close()
    waits for the step (or says it gave up, so the server can leave with os._exit)."""
    folder, _ = tiny_models.make_internlm2(tmp_path / "internlm2")
    bundle = load_bundle(str(folder), EngineConfig(dtype="float32", device="cpu"))
    engine = AsyncEngine(LLMEngine(bundle, EngineConfig(cache_max_tokens=256)))
    in_step, release = threading.Event(), threading.Event()
    real_step = engine.engine.step

    def long_step():  # stands for a long prefill
        if engine.engine.has_unfinished():
            in_step.set()
            release.wait(30)
        return real_step()

    engine.engine.step = long_step

    async def scenario() -> tuple[bool, float, bool]:
        stream = engine.generate(None, GenerationConfig(max_new_tokens=2), input_ids=[1, 5, 9])
        first = asyncio.ensure_future(anext(stream))
        assert await asyncio.to_thread(in_step.wait, 30)
        start = time.monotonic()
        gave_up = engine.close(timeout_s=0.3)
        waited_s = time.monotonic() - start
        still_running = engine._thread.is_alive()
        release.set()
        await first
        await stream.aclose()
        return gave_up, waited_s, still_running

    stopped, waited_s, still_running = asyncio.run(scenario())
    assert not stopped and still_running and 0.25 < waited_s < 5
    assert engine.close() and not engine._thread.is_alive()
