"""The compiled CPU decode step (engine/cpu_compiled_decode.py), on by default on CPU engines:
compiled once per session for a float32 tiny Llama, in the background while the eager path
serves the first request; then greedy tokens equal the eager engine's exactly, at batch 1 and
in batches (one dynamic-batch graph), over block boundaries and a cache full of NaN bits past
every context. A failed compile leaves the engine eager with one warning line.

The rest of the suite keeps CPU engines eager (tests/conftest.py sets LITEDEPLOY_CPU_COMPILE=0);
these tests switch it back on."""

from __future__ import annotations

import logging
import math
import os
import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine import cpu_compiled_decode
from litedeploy.engine.cpu_compile_cache import (
    MIN_TORCH_FOR_BACKGROUND_COMPILE,
    compiled_decode_of,
    decode_status_text,
    inductor_cache_dir,
    torch_compiles_in_background,
)
from litedeploy.engine.cpu_compiled_decode import CompiledCPUDecode
from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.input_builder import HostStepInputs
from litedeploy.model_bundle import load_bundle
from tests.helpers.tiny_models import make_llama

# 4-token blocks: every prompt crosses block boundaries while decoding; lengths differ, so the
# batched steps pad tables of 1 to 6 blocks
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12, 13], [9], [1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11]]
GEN = GenerationConfig(max_new_tokens=12, ignore_eos=True)
COMPILE_TIMEOUT_S = 900
# older PyTorch crashed compiling off the main thread: the engine keeps it off there (tested below)
needs_background_compile = pytest.mark.skipif(
    not torch_compiles_in_background(),
    reason=f"torch {torch.__version__}: the background compile needs {MIN_TORCH_FOR_BACKGROUND_COMPILE}+")


@pytest.fixture(scope="module")
def switched_on(tmp_path_factory):
    """Compiling on, into an empty cache folder of its own (Inductor's env var restored after)."""
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("LITEDEPLOY_CPU_COMPILE", "1")
        patch.setenv("LITEDEPLOY_CACHE_DIR", str(tmp_path_factory.mktemp("cache")))
        patch.delenv("TORCHINDUCTOR_CACHE_DIR", raising=False)
        yield patch


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    folder, _ = make_llama(tmp_path_factory.mktemp("llama"))
    return load_bundle(str(folder), EngineConfig(device="cpu", dtype="float32"))


def _engine(bundle, **overrides) -> LLMEngine:
    return LLMEngine(bundle, EngineConfig(cache_block_seq_len=4, cache_max_tokens=256,
                                          **overrides))


def _tokens(engine: LLMEngine, prompts: list[list[int]]) -> list[list[int]]:
    return [out.token_ids for out in engine.generate(prompts, GEN)]


@pytest.fixture(scope="module")
def eager(bundle):
    return _engine(bundle, eager_mode=True)


@pytest.fixture(scope="module")
def compiled(switched_on, bundle, eager):
    """The one compile of the session. Its warm-up waits for a gate, so the first request is
    served (eagerly) while the compile is certainly still running."""
    gate = threading.Event()
    warm_up = CompiledCPUDecode._warm_up

    def gated(self):
        gate.wait()
        warm_up(self)

    switched_on.setattr(CompiledCPUDecode, "_warm_up", gated)
    engine = _engine(bundle)
    graphs = compiled_decode_of(engine)
    try:
        first = _tokens(engine, PROMPTS[:1])
        while_compiling = (graphs.status, decode_status_text(engine), graphs.num_runs)
    finally:
        gate.set()
    assert graphs.wait(COMPILE_TIMEOUT_S) == "on", graphs.off_reason
    return engine, {"first": first, "while_compiling": while_compiling}


@needs_background_compile
def test_serves_while_compiling_then_switches_over(compiled, eager):
    engine, record = compiled
    assert record["while_compiling"] == ("compiling", "eager while compiling in the background", 0)
    assert record["first"] == _tokens(eager, PROMPTS[:1])
    assert decode_status_text(engine).startswith("compiled (in ")
    # the persistent cache: under LITEDEPLOY_CACHE_DIR, one folder per CPU capability
    folder = inductor_cache_dir()
    assert folder.parent.parent == Path(os.environ["LITEDEPLOY_CACHE_DIR"])
    assert folder.name == torch.backends.cpu.get_cpu_capability().lower()
    assert os.environ["TORCHINDUCTOR_CACHE_DIR"] == str(folder) and any(folder.iterdir())


@needs_background_compile
def test_batch_one_tokens_equal_the_eager_path(compiled, eager):
    engine, _ = compiled
    graphs = compiled_decode_of(engine)
    for cache in (*engine.kv_cache.k_caches, *engine.kv_cache.v_caches):
        cache.fill_(math.nan)  # slots past every context: masked, never leaking into the logits
    for prompt in (PROMPTS[0], PROMPTS[2]):
        before = graphs.num_runs
        assert _tokens(engine, [prompt]) == _tokens(eager, [prompt])
        # every decode step compiled; a one-token prompt's prefill is decode-shaped too
        num_decode_shaped = GEN.max_new_tokens - (len(prompt) > 1)
        assert graphs.num_runs - before == num_decode_shaped


@needs_background_compile
def test_batched_tokens_equal_the_eager_path(compiled, eager):
    engine, _ = compiled
    graphs = compiled_decode_of(engine)
    for count in (2, 4):
        before = graphs.num_runs
        assert _tokens(engine, PROMPTS[:count]) == _tokens(eager, PROMPTS[:count])
        assert graphs.num_runs - before == GEN.max_new_tokens - 1  # one batched step each
    assert graphs.status == "on"  # no step fell back (a recompile would have)


def _host(q_lens: list[int], context_lens: list[int], samples: int | None = None):
    batch = len(q_lens)
    num_tokens = sum(q_lens)
    zeros = np.zeros(num_tokens, dtype=np.int64)
    cu = np.cumsum([0, *q_lens]).tolist()
    rows = cu[1:][: batch if samples is None else samples]
    tables = [list(range(-(-n // 4))) for n in context_lens]
    return HostStepInputs(zeros, zeros, zeros + 1, zeros, tables, context_lens, cu,
                          [r - 1 for r in rows], max(q_lens), max(context_lens))


@needs_background_compile
def test_only_plain_decode_steps_go_compiled(compiled):
    graphs = compiled_decode_of(compiled[0])
    assert graphs.can_run(_host([1], [9]))
    assert graphs.can_run(_host([1, 1, 1], [9, 12, 5]))
    assert not graphs.can_run(_host([1], [9]), num_steps=4)  # bursts stay eager
    assert not graphs.can_run(_host([1, 5], [9, 5]))  # a mixed step: its decode rows too
    assert not graphs.can_run(_host([1, 1], [9, 12], samples=1))
    # padding every row to the longest context would read over twice the blocks needed
    assert not graphs.can_run(_host([1, 1, 1, 1], [200, 3, 3, 3]))


def test_a_failed_compile_logs_one_line_and_serves_eagerly(switched_on, bundle, eager,
                                                           monkeypatch, caplog):
    def broken(self):
        raise RuntimeError("no C++ compiler found\n(second line of a long error)")

    monkeypatch.setattr(CompiledCPUDecode, "_warm_up", broken)
    caplog.set_level(logging.INFO, logger=cpu_compiled_decode.__name__)
    engine = _engine(bundle)
    graphs = compiled_decode_of(engine)
    assert graphs.wait(60) == "off"
    assert _tokens(engine, PROMPTS[:2]) == _tokens(eager, PROMPTS[:2])
    records = [r for r in caplog.records if r.name == cpu_compiled_decode.__name__]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert "no C++ compiler found" in records[0].getMessage()
    assert "second line" not in records[0].getMessage()
    assert decode_status_text(engine).startswith("eager (compile failed: RuntimeError: no C++")
    assert graphs.num_runs == 0


def test_what_keeps_it_off(switched_on, bundle):
    assert compiled_decode_of(_engine(bundle, eager_mode=True)) is None
    assert decode_status_text(_engine(bundle, eager_mode=True)) == "eager (--eager-mode)"
    quantized = _engine(bundle, quant_policy=8)
    assert decode_status_text(quantized) == "eager (quantized KV cache (--quant-policy 8))"
    switched_on.setenv("LITEDEPLOY_CPU_COMPILE", "0")
    try:
        assert decode_status_text(_engine(bundle)) == "eager (LITEDEPLOY_CPU_COMPILE=0)"
    finally:
        switched_on.setenv("LITEDEPLOY_CPU_COMPILE", "1")


def test_older_torch_stays_eager_unless_asked(switched_on, bundle, monkeypatch):
    monkeypatch.setattr(torch, "__version__", "2.11.0+cu130")
    monkeypatch.delenv("LITEDEPLOY_CPU_COMPILE")
    engine = _engine(bundle)
    assert compiled_decode_of(engine) is None
    assert decode_status_text(engine) == (
        "eager (torch 2.11.0+cu130 < 2.13: LITEDEPLOY_CPU_COMPILE=1 compiles anyway)")
    monkeypatch.setenv("LITEDEPLOY_CPU_COMPILE", "1")
    assert _engine(bundle).runner.cpu_compile_off_reason is None
