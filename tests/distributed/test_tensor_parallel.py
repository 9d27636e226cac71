"""--tp 2 on CPU processes (gloo) generates exactly what --tp 1 generates."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.distributed.parallel_state import tp_state
from litedeploy.engine.engine import LLMEngine
from litedeploy.errors import ModelLoadError
from tests.helpers import tiny_models

BUILDERS = {
    "internlm2": tiny_models.make_internlm2,
    "llama": lambda d: tiny_models.make_llama(d, tie=True),
    "qwen2": tiny_models.make_qwen2,
}
PROMPTS = [[1] + [(7 * j + i) % 250 + 20 for j in range(n)] for i, n in enumerate([5, 30, 12, 41])]
SHARED = [1] + [(3 * j) % 250 + 20 for j in range(24)]


def _run(folder, tp: int) -> list[list[int]]:
    # a small cache forces preemption; the shared prefix exercises prefix caching
    config = EngineConfig(tp=tp, dtype="float32", device="cpu", cache_block_seq_len=4,
                          cache_max_tokens=96, enable_prefix_caching=True, check_integrity=True)
    engine = LLMEngine.from_pretrained(str(folder), config)
    try:
        gen = GenerationConfig(max_new_tokens=20, ignore_eos=True)
        first = engine.generate([SHARED + [40, 41]], gen)
        rest = engine.generate(PROMPTS + [SHARED + [50]], gen)
        assert engine.block_manager.stats.num_prefix_hit_tokens > 0
        assert engine.num_preemptions > 0
        return [o.token_ids for o in first + rest]
    finally:
        engine.close()


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_tp2_equals_tp1(tmp_path, kind):
    folder, _ = BUILDERS[kind](tmp_path / kind)
    expected = _run(folder, 1)
    assert _run(folder, 2) == expected
    assert tp_state().world_size == 1  # the process group is gone after close()


def test_tp_that_does_not_divide_heads(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    with pytest.raises(ModelLoadError, match="--tp 3 does not divide"):
        LLMEngine.from_pretrained(str(folder), EngineConfig(tp=3, device="cpu"))


def test_dead_worker_fails_loudly(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    script = textwrap.dedent(f"""
        import sys
        from litedeploy.config import EngineConfig, GenerationConfig
        from litedeploy.engine.engine import LLMEngine
        engine = LLMEngine.from_pretrained({str(folder)!r}, EngineConfig(tp=2, device="cpu",
                                           cache_max_tokens=256, cache_block_seq_len=4))
        print("worker", engine.workers.processes[0].pid, flush=True)
        while True:
            engine.generate([[1, 2, 3]], GenerationConfig(max_new_tokens=8, ignore_eos=True))
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=os.getcwd())
    try:
        line = proc.stdout.readline()
        assert line.startswith("worker"), proc.stderr.read()
        os.kill(int(line.split()[1]), signal.SIGKILL)
        start = time.monotonic()
        code = proc.wait(timeout=60)
        assert code != 0
        assert time.monotonic() - start < 30
        assert "died" in proc.stderr.read()
    finally:
        if proc.poll() is None:
            proc.kill()
