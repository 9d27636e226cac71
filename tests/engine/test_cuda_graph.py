"""CUDA graph logic: the batch-size ladder, padding that writes nothing, static buffers that give
the eager logits. The static-buffer path runs on CPU through the torch twins (the graph only
replays it); the capture/replay test itself needs CUDA and is skipped without it."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.cuda_graph import DecodeGraphs, graph_batch_sizes, pick_graph_batch_size
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.input_builder import build_host_inputs, to_device
from litedeploy.model_bundle import load_bundle
from tests.helpers import tiny_models


def test_ladder_is_powers_then_every_8_up_to_the_max():
    assert graph_batch_sizes(256) == [1, 2, 4, *range(8, 257, 8)]
    assert graph_batch_sizes(3) == [1, 2, 3]
    assert graph_batch_sizes(20) == [1, 2, 4, 8, 16, 20]  # the max itself is always captured
    assert graph_batch_sizes(1000)[-1] == 256  # capped: bigger batches run eagerly
    with pytest.raises(ValueError):
        graph_batch_sizes(0)


def test_pick_pads_up_to_the_next_size_or_refuses():
    sizes = graph_batch_sizes(64)
    assert [pick_graph_batch_size(sizes, n) for n in (1, 2, 3, 5, 8, 9, 64)] == [
        1, 2, 4, 8, 8, 16, 64]
    assert pick_graph_batch_size(sizes, 65) is None


@pytest.fixture(scope="module")
def engine(tmp_path_factory):
    folder, _ = tiny_models.make_internlm2(tmp_path_factory.mktemp("m") / "internlm2")
    bundle = load_bundle(str(folder), EngineConfig(dtype="float32", device="cpu"))
    return LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=1024,
                                          max_batch_size=16))


def _decode_batch(engine: LLMEngine, prompt_lens: list[int]):
    gen = GenerationConfig(max_new_tokens=8, ignore_eos=True)
    for i, n in enumerate(prompt_lens):
        engine.add_request(f"d{len(engine._requests)}-{i}", [(7 * j + i) % 250 + 20
                                                            for j in range(n)], gen)
    engine.step()  # prefill everything; the next schedule is a pure decode batch
    return engine.scheduler.schedule()


@torch.inference_mode()
def test_static_buffers_give_eager_logits_and_padding_writes_nothing(engine):
    batch = _decode_batch(engine, [5, 17, 30])  # 3 rows, padded to the graph size 4
    runner, block_size = engine.runner, engine.kv_cache.shape.block_size
    host = build_host_inputs(batch, block_size)
    assert host.is_uniform_decode and host.batch_size == 3
    caches = engine.kv_cache.k_caches + engine.kv_cache.v_caches
    before = [c.clone() for c in caches]
    eager = runner.forward(to_device(host, engine.device))
    after_eager = [c.clone() for c in caches]
    for cache, saved in zip(caches, before):
        cache.copy_(saved)

    graphs = DecodeGraphs(runner.forward, 16, engine.session_len, block_size, engine.device)
    size = graphs.load(host)
    assert size == 4
    static = graphs.static_inputs(size)
    assert static.slot_mapping[3].item() == -1 and static.context_lens[3].item() == 0
    padded = runner.forward(static)
    assert padded.shape[0] == 4
    torch.testing.assert_close(padded[:3], eager, rtol=1e-5, atol=1e-5)
    for cache, expected in zip(caches, after_eager):
        # real rows stored the same K/V, the padding row stored nothing (cache is uninitialized
        # memory, hence equal_nan)
        torch.testing.assert_close(cache, expected, rtol=1e-5, atol=1e-5, equal_nan=True)

    # a smaller batch after a larger one: stale rows of the bigger step must not leak in
    small_host = dataclasses.replace(
        host, input_ids=host.input_ids[:1], positions=host.positions[:1],
        rope_lens=host.rope_lens[:1], slot_mapping=host.slot_mapping[:1],
        block_tables=host.block_tables[:1], context_lens=host.context_lens[:1],
        cu_seqlens_q=host.cu_seqlens_q[:2], logits_indices=[0],
        max_context_len=host.context_lens[0])
    before = [c.clone() for c in caches]
    eager = runner.forward(to_device(small_host, engine.device))
    for cache, saved in zip(caches, before):
        cache.copy_(saved)
    size = graphs.load(small_host)
    assert size == 1
    torch.testing.assert_close(runner.forward(graphs.static_inputs(size)), eager,
                               rtol=1e-5, atol=1e-5)


def test_graphs_are_off_on_cpu(engine):
    assert engine.runner.graphs is None


@pytest.mark.skipif(not torch.cuda.is_available(), reason="CUDA graphs need CUDA")
def test_cuda_graphs_match_eager_on_long_contexts(tmp_path):
    """Contexts far beyond one decode partition: a graph captured at session_len must not drop
    keys of any sequence, and must give the eager engine's tokens."""
    folder, _ = tiny_models.make_internlm2(tmp_path / "internlm2", max_position_embeddings=2048)
    bundle = load_bundle(str(folder), EngineConfig(dtype="float32", device="cuda"))
    prompts = [[(5 * j + i) % 250 + 20 for j in range(n)] for i, n in enumerate([3, 300, 1500])]
    gen = GenerationConfig(max_new_tokens=24, ignore_eos=True)
    results = {}
    # eager with a small prefill budget: chunks of the long prompts share steps with decode rows
    # of the short one (the split decode/prefill attention path); graphs: one prefill, then
    # decode one step per sync, then greedy bursts of 8 steps per sync (graph + advance graph)
    for name, eager, budget, steps in (("eager", True, 256, 1), ("graphs", False, 8192, 1),
                                       ("bursts", False, 8192, 8)):
        config = EngineConfig(cache_block_seq_len=16, cache_max_tokens=8192, max_batch_size=8,
                              session_len=2048, eager_mode=eager, max_prefill_token_num=budget,
                              num_scheduler_steps=steps)
        engine = LLMEngine(bundle, config)
        results[name] = [out.token_ids for out in engine.generate(prompts, gen)]
        if not eager:
            assert engine.runner.graphs is not None and engine.runner.graphs.num_replays >= 20
        assert (engine.num_burst_steps > 0) == (steps > 1)
        assert engine.block_manager.num_free_blocks == engine.block_manager.num_blocks
    assert results["graphs"] == results["eager"]
    assert results["bursts"] == results["eager"]
