"""--tp 2 start-up, serving and shut-down, each in its own process with a deadline.

Every collective (the warm-up forward, the KV cache's free-memory gather, graph capture, each
step) must be entered by all ranks; one that rank 0 enters alone hangs for ever, so these run the
engine in a child process and fail on a timeout instead of hanging the suite. The CPU test runs
over gloo (the warm-up runs on CPU too under TP); the GPU ones need two CUDA devices (NCCL).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import tiny_models

REPO_ROOT = Path(__file__).resolve().parents[2]
TWO_GPUS = pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs 2 CUDA devices")

# tp 1 then tp 2 in one child: greedy tokens, KV plan, burst steps, workers' exit codes
ENGINE_SCRIPT = """
import json, sys
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.distributed.parallel_state import tp_state
from litedeploy.engine.engine import LLMEngine

folder, device, dtype, eager = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
prompts = [[1] + [(7 * j + i) % 250 + 20 for j in range(n)] for i, n in enumerate([5, 30, 12])]
gen = GenerationConfig(max_new_tokens=16, ignore_eos=True)
report = {}
for tp in (1, 2):
    # no --cache-max-tokens: the cache is planned from every rank's free memory
    config = EngineConfig(tp=tp, device=device, dtype=dtype, session_len=96, max_batch_size=4,
                          cache_block_seq_len=4, max_prefill_token_num=128,
                          num_scheduler_steps=4, eager_mode=eager)
    engine = LLMEngine.from_pretrained(folder, config)
    processes = engine.workers.processes if engine.workers else []
    tokens = [out.token_ids for out in engine.generate(prompts, gen)]
    graphs = engine.runner.graphs
    report[tp] = {"tokens": tokens, "kv_tokens": engine.kv_cache.shape.num_tokens,
                  "burst_steps": engine.num_burst_steps,
                  "graph_replays": graphs.num_replays if graphs is not None else 0}
    del graphs  # close() frees the graphs (captured all-reduces) before NCCL's teardown
    engine.close()
    report[tp]["worker_exit_codes"] = [p.exitcode for p in processes]
    report[tp]["world_size_after_close"] = tp_state().world_size
print("REPORT", json.dumps(report), flush=True)
"""


def _env() -> dict[str, str]:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1",
               NCCL_NVLS_ENABLE="0", TORCH_SYMM_MEM_DISABLE_MULTICAST="1",
               NVSHMEM_DISABLE_NVLS="1")
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO_ROOT), env.get("PYTHONPATH")]))
    return env


def _kill_group(proc: subprocess.Popen) -> None:
    """The child and the workers it spawned (one process group): nothing outlives a test."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    proc.wait()


def _run_engines(folder: Path, device: str, dtype: str, eager: bool, timeout_s: float) -> dict:
    proc = subprocess.Popen(
        [sys.executable, "-c", ENGINE_SCRIPT, str(folder), device, dtype, "1" if eager else "0"],
        cwd=REPO_ROOT, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        _kill_group(proc)
        pytest.fail(f"--tp 2 did not start, generate and stop within {timeout_s} s (a "
                    "collective entered by rank 0 alone?)")
    assert proc.returncode == 0, err[-3000:]
    line = next(line for line in out.splitlines() if line.startswith("REPORT "))
    return {int(tp): value for tp, value in json.loads(line.split(" ", 1)[1]).items()}


def _check_lifecycle(report: dict) -> None:
    one, two = report[1], report[2]
    assert two["tokens"] == one["tokens"]
    assert all(len(tokens) == 16 for tokens in two["tokens"])
    assert two["burst_steps"] > 0  # multi-step bursts ran on both ranks
    assert two["kv_tokens"] == one["kv_tokens"] == 4 * 96  # the plan's cap, after the gather
    assert two["worker_exit_codes"] == [0]  # the worker stopped cleanly on close()
    assert two["world_size_after_close"] == 1


def test_tp2_cpu_start_generate_shutdown(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    _check_lifecycle(_run_engines(folder, "cpu", "float32", eager=True, timeout_s=150))


@TWO_GPUS
def test_tp2_gpu_start_generate_shutdown(tmp_path):
    """NCCL: warm-up, the free-memory gather, CUDA graph capture and multi-step bursts on both
    GPUs; float32 so the tokens must equal tp 1's."""
    folder, _ = tiny_models.make_internlm2(tmp_path / "m")
    report = _run_engines(folder, "cuda", "float32", eager=False, timeout_s=240)
    _check_lifecycle(report)
    assert report[2]["graph_replays"] > 0


def _children(pid: int) -> list[int]:
    """Live processes whose parent is `pid` (Linux /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                stat = (entry / "stat").read_text()
            except OSError:
                continue
            if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
                found.append(int(entry.name))
    return found


@TWO_GPUS
def test_tp2_gpu_api_server_serves_and_exits(tmp_path):
    """`serve api_server --tp 2`: answers through the official client, then SIGTERM stops the
    server and its worker with exit code 0."""
    import httpx
    import openai

    from tests.serve.conftest import free_port

    folder, _ = tiny_models.make_llama(tmp_path / "m")
    port = free_port()
    log_path = tmp_path / "server.log"
    with open(log_path, "wb") as log:
        proc = subprocess.Popen(
            [sys.executable, "-m", "litedeploy", "serve", "api_server", str(folder), "--tp", "2",
             "--dtype", "float32", "--session-len", "256", "--max-batch-size", "8",
             "--server-port", str(port)],
            cwd=REPO_ROOT, env=_env(), stdout=log, stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL, start_new_session=True)
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 240
        while True:
            assert proc.poll() is None, log_path.read_text(errors="replace")
            assert time.monotonic() < deadline, "api_server --tp 2 not ready:\n" + (
                log_path.read_text(errors="replace"))
            try:
                if httpx.get(url + "/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.5)
        workers = _children(proc.pid)
        assert workers, "no tensor-parallel worker process"
        client = openai.OpenAI(base_url=url + "/v1", api_key="none")
        model = client.models.list().data[0].id
        reply = client.completions.create(model=model, prompt="hello there", max_tokens=12,
                                          temperature=0)
        assert 1 <= reply.usage.completion_tokens <= 12
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 0, log_path.read_text(errors="replace")
        deadline = time.monotonic() + 15  # children (worker, resource tracker) end with it
        while (alive := [pid for pid in workers if _is_running(pid)]) and (
                time.monotonic() < deadline):
            time.sleep(0.2)
        assert not alive, f"workers still running after the server exited: {alive}"
    finally:
        _kill_group(proc)  # no-op when all exited; otherwise nothing outlives the test


def _is_running(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False
