"""`litedeploy serve ray`: two replicas of the embedded model behind Ray Serve, on a local Ray
cluster that the command starts (as a user would), reached with the official openai client.

One cluster serves the whole module; the replica-kill test runs last because it leaves a new
replica starting.
"""

from __future__ import annotations

import asyncio
import json
import re
import signal
import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import REPO_ROOT, free_port, start_litedeploy, subprocess_env

REPLICA_HEADER = "x-litedeploy-replica"
BLOCK_LEN = 64  # --cache-block-seq-len (the prefix cache hits whole blocks)
RESTART_TIMEOUT_S = 180


def test_without_ray_one_clear_line_and_exit_2():
    # Ray hidden from the import system, as on an install without the `ray` extra
    code = ("import sys; sys.modules['ray'] = None; from litedeploy.cli.main import main; "
            "sys.exit(main(['serve', 'ray', '--replicas', '2']))")
    proc = subprocess.run([sys.executable, "-c", code], cwd=REPO_ROOT, env=subprocess_env(),
                          capture_output=True, text=True, timeout=120, check=False)
    assert proc.returncode == 2, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "pip install 'litedeploy[ray]'" in lines[0], proc.stderr


def test_replica_bounds_checked_before_ray_starts():
    proc = subprocess.run(
        [sys.executable, "-m", "litedeploy", "serve", "ray", "--replicas", "3",
         "--max-replicas", "2"], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=120, check=False)
    assert proc.returncode == 2
    assert proc.stderr.strip() == ("litedeploy: error: --replicas 3 must lie between "
                                   "--min-replicas 1 and --max-replicas 2")


def test_autoscaling_bounds_reach_ray_serve_config():
    pytest.importorskip("ray.serve")
    from litedeploy.serve.ray_app import EngineReplica, ReplicaOptions

    options = ReplicaOptions(num_replicas=2, min_replicas=1, max_replicas=3, num_gpus=2.0)
    deployment = EngineReplica.options(**options.replica_kwargs())
    config = deployment._deployment_config  # what Ray Serve's controller receives
    autoscaling = config.autoscaling_config
    assert (autoscaling.min_replicas, autoscaling.initial_replicas,
            autoscaling.max_replicas) == (1, 2, 3)
    assert deployment.ray_actor_options["num_gpus"] == 2.0  # --tp GPUs per replica
    assert config.request_router_config.request_router_class.endswith("PrefixAffinityRouter")


# ---- a running deployment ------------------------------------------------------------------------
@pytest.fixture(scope="module")
def ray_server(tmp_path_factory):
    pytest.importorskip("ray.serve")
    port = free_port()
    server = start_litedeploy(
        ["serve", "ray", "--replicas", "2", "--enable-prefix-caching", "--cache-max-tokens",
         "8192", "--cache-block-seq-len", str(BLOCK_LEN), "--session-len", "2048",
         "--server-port", str(port)], port, tmp_path_factory.mktemp("ray") / "serve.log")
    try:
        _wait_for_line(server, "serving http://")
        yield server
    finally:
        _stop(server)


def _stop(server) -> None:
    """SIGINT: the command shuts Ray Serve and its local cluster down; if it cannot within a
    minute, stop the cluster's processes too."""
    server.proc.send_signal(signal.SIGINT)
    try:
        server.proc.wait(timeout=60)
    except subprocess.TimeoutExpired:
        server.proc.kill()
        server.proc.wait()
        subprocess.run([sys.executable, "-m", "ray.scripts.scripts", "stop", "--force"],
                       env=subprocess_env(), capture_output=True, timeout=60, check=False)


def _wait_for_line(server, text: str, timeout_s: float = 300) -> None:
    deadline = time.monotonic() + timeout_s
    while text not in server.log():
        if server.proc.poll() is not None or time.monotonic() > deadline:
            pytest.fail(f"serve ray did not start:\n{server.log()[-4000:]}")
        time.sleep(0.5)


@pytest.fixture(scope="module")
def model(ray_server) -> str:
    return httpx.get(ray_server.url + "/v1/models", timeout=60).json()["data"][0]["id"]


def _client(server):
    from openai import AsyncOpenAI

    # a bound, not a speed test: with PyTorch's scalar kernels (ATEN_CPU_CAPABILITY=default) and
    # one thread, 64 streams on two replicas took longer than 300 s
    return AsyncOpenAI(base_url=server.url + "/v1", api_key="EMPTY", timeout=1200, max_retries=0)


async def _stream_chat(client, model: str, prompt: str, max_tokens: int) -> tuple[str, str, str]:
    """(replica id, text, finish_reason) of one streamed chat completion."""
    raw = await client.chat.completions.with_raw_response.create(
        model=model, messages=[{"role": "user", "content": prompt}], max_tokens=max_tokens,
        temperature=0, stream=True)
    text, finish = "", None
    async for chunk in raw.parse():
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
    return raw.headers[REPLICA_HEADER], text, finish


def test_64_concurrent_streams_over_both_replicas(ray_server, model):
    async def run():
        client = _client(ray_server)
        return await asyncio.gather(*(
            _stream_chat(client, model, f"Say something about the number {i}.", 8)
            for i in range(64)))

    results = asyncio.run(run())
    assert all(text and finish in ("length", "stop") for _, text, finish in results)
    assert len({replica for replica, _, _ in results}) == 2  # 64 distinct prompts: both used


def _prefix_counters(server, replica_id: str) -> tuple[float, float]:
    """(hit tokens, looked-up tokens) of one replica's prefix cache, from its /metrics."""
    text = httpx.get(server.url + "/metrics", headers={REPLICA_HEADER: replica_id},
                     timeout=60).text
    values = [float(re.search(rf"^litedeploy:{name}\{{.*\}} (\S+)$", text, re.MULTILINE)
                    .group(1))
              for name in ("prefix_cache_hit_tokens", "prefix_cache_query_tokens")]
    return values[0], values[1]


def _replica_ids(server, model: str) -> set[str]:
    ids: set[str] = set()
    for i in range(40):
        if len(ids) == 2:
            break
        response = httpx.post(server.url + "/v1/completions", timeout=60, json={
            "model": model, "prompt": f"probe {i}", "max_tokens": 1})
        assert response.status_code == 200, response.text
        ids.add(response.headers[REPLICA_HEADER])
    return ids


def test_shared_prefix_lands_on_the_replica_that_holds_it(ray_server, model):
    # ~1,000 tokens shared by 16 prompts that differ only at their end
    prefix = " ".join(f"Item {i} of the shared catalogue is a {('red', 'blue', 'green')[i % 3]} box."
                      for i in range(100))
    replicas = sorted(_replica_ids(ray_server, model))
    assert len(replicas) == 2
    before = {r: _prefix_counters(ray_server, r) for r in replicas}

    async def run():
        client = _client(ray_server)
        served = []
        for wave in range(4):  # 4 at a time: the first wave's prefix is cached after it
            raws = await asyncio.gather(*(client.completions.with_raw_response.create(
                model=model, prompt=f"{prefix}\nQuestion {wave * 4 + i}: which box is first?",
                max_tokens=2, temperature=0) for i in range(4)))
            served += [raw.headers[REPLICA_HEADER] for raw in raws]
        return served

    served = asyncio.run(run())
    assert len(set(served)) == 1, served
    holder = served[0]
    after = {r: _prefix_counters(ray_server, r) for r in replicas}
    prompt_len = after[holder][1] - before[holder][1]
    assert prompt_len > 16 * 900  # 16 prompts of ~1,000 tokens looked up on the holder
    hits = after[holder][0] - before[holder][0]
    # every prompt after the first wave hits the whole shared prefix (block-aligned)
    assert hits >= 12 * (900 // BLOCK_LEN) * BLOCK_LEN
    other = next(r for r in replicas if r != holder)
    assert after[other] == before[other]  # the other replica saw none of them


def _gauge(server, replica_id: str, name: str) -> float:
    text = httpx.get(server.url + "/metrics", headers={REPLICA_HEADER: replica_id},
                     timeout=60).text
    return float(re.search(rf"^litedeploy:{name}\{{.*\}} (\S+)$", text, re.MULTILINE).group(1))


def test_client_that_leaves_mid_stream_frees_its_replica(ray_server, model):
    body = {"model": model, "prompt": "Count on and on:", "max_tokens": 1500, "stream": True,
            "ignore_eos": True}
    with httpx.stream("POST", ray_server.url + "/v1/completions", json=body,
                      timeout=60) as response:
        replica = response.headers[REPLICA_HEADER]
        events = response.iter_lines()
        for _ in range(3):
            next(events)
        assert _gauge(ray_server, replica, "num_requests_running") == 1
    # the proxy, the ingress and the replica's app each see the disconnect: the engine aborts
    deadline = time.monotonic() + 30
    while _gauge(ray_server, replica, "num_requests_running") > 0:
        assert time.monotonic() < deadline, "the request still runs after its client left"
        time.sleep(0.5)
    assert _gauge(ray_server, replica, "kv_cache_usage_perc") == 0.0


def test_bench_serving_against_the_deployment(ray_server, tmp_path):
    # the same proxy twice, once with /v1: the round-robin form used for routerless replicas
    out = tmp_path / "bench.json"
    proc = subprocess.run(
        [sys.executable, "-m", "litedeploy", "bench", "serving", "--url",
         f"{ray_server.url}/v1,{ray_server.url}", "--num-prompts", "8", "--max-tokens", "4",
         "--output-json", str(out)], cwd=REPO_ROOT, env=subprocess_env(), capture_output=True,
        text=True, timeout=300, check=False)
    assert proc.returncode == 0, proc.stderr
    result = json.loads(out.read_text())
    assert result["completed"] == 8 and result["total_output_tokens"] == 8 * 4
    assert result["url"] == f"{ray_server.url},{ray_server.url}"


def test_killed_replica_fails_its_streams_cleanly_and_is_replaced(ray_server, model):
    import openai
    import ray

    MAX_TOKENS = 200  # long enough to be in flight when the replica dies

    async def stream(client, i: int, started: asyncio.Event, on: dict[int, str]):
        raw = await client.chat.completions.with_raw_response.create(
            model=model, messages=[{"role": "user", "content": f"Tell a long story, number {i}."}],
            max_tokens=MAX_TOKENS, temperature=0, stream=True, extra_body={"ignore_eos": True})
        on[i] = raw.headers[REPLICA_HEADER]
        num_chunks, finish = 0, None
        async for chunk in raw.parse():
            num_chunks += 1
            if num_chunks == 2:
                started.set()
            if chunk.choices:
                finish = chunk.choices[0].finish_reason or finish
        # the finish reason, not the chunk count: a character split over tokens is held back
        # until complete, so 200 tokens can arrive in fewer chunks
        return finish

    async def run():
        client = _client(ray_server)
        on: dict[int, str] = {}
        # 16 distinct prompts: both replicas get some (all on one: 2 ** -15)
        events = [asyncio.Event() for _ in range(16)]
        tasks = [asyncio.ensure_future(stream(client, i, events[i], on)) for i in range(16)]
        await asyncio.wait_for(asyncio.gather(*(event.wait() for event in events)), 240)
        victim = on[0]
        ray.kill(ray.get_actor(f"SERVE_REPLICA::litedeploy#EngineReplica#{victim}",
                               namespace="serve"), no_restart=False)
        results = await asyncio.gather(*tasks, return_exceptions=True)
        return victim, on, results

    ray.init(address="auto", logging_level="ERROR", log_to_driver=False)
    try:
        victim, on, results = asyncio.run(run())
    finally:
        ray.shutdown()
    assert len(set(on.values())) == 2  # streams on the killed replica and on the other
    for i, result in enumerate(results):
        if on[i] == victim:  # a clean error event, no hang, no broken connection
            assert isinstance(result, openai.APIError), result
            assert "replica serving this request failed" in str(result)
        else:
            assert result == "length", result  # the others went on to max_tokens
    # Ray Serve replaces the replica; both answer again
    deadline = time.monotonic() + RESTART_TIMEOUT_S
    while time.monotonic() < deadline:
        replicas = _replica_ids(ray_server, model)
        if len(replicas) == 2 and victim not in replicas:
            return
        time.sleep(2)
    pytest.fail(f"no second replica {RESTART_TIMEOUT_S} s after the kill:\n{ray_server.log()}")
