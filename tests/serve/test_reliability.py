"""The api_server under load, overload and misbehaving clients, with nothing leaked; SIGTERM drains.

One server of this module runs with debug endpoints, one sequence per step and one waiting slot,
so queueing, faults and leaks are deterministic; the load test uses the session's open server.
"""

from __future__ import annotations

import json
import signal
import socket
import struct
import threading
import time

import httpx
import pytest

from tests.serve.conftest import free_port, start_litedeploy, wait_until_ready
from tests.serve.test_api_server import assert_envelope, metric_values

READ_TIMEOUT_S = 1.5
NUM_DISCONNECTS = 100


@pytest.fixture(scope="module")
def debug_server(tmp_path_factory):
    port = free_port()
    server = start_litedeploy(
        ["serve", "api_server", "--server-port", str(port), "--cache-max-tokens", "4096",
         "--session-len", "256", "--max-batch-size", "1", "--max-waiting-requests", "1",
         "--enable-debug-endpoints", "--request-read-timeout", str(READ_TIMEOUT_S),
         "--timeout-keep-alive", "1", "--drain-timeout", "30"],
        port, tmp_path_factory.mktemp("reliability") / "server.log")
    try:
        wait_until_ready(server)
        yield server
    finally:
        server.stop()


@pytest.fixture(scope="module")
def model(debug_server) -> str:
    return httpx.get(debug_server.url + "/v1/models").json()["data"][0]["id"]


def state(url: str) -> dict:
    return httpx.get(url + "/debug/state", timeout=10).json()


def wait_idle(url: str, timeout_s: float = 10.0) -> dict:
    """The state once nothing runs, waits or is queued (aborts land a moment after a hang-up)."""
    deadline = time.monotonic() + timeout_s
    while True:
        current = state(url)
        idle = not any(current[key] for key in ("num_running", "num_waiting", "num_queued",
                                                "num_in_flight", "num_engine_streams",
                                                "num_engine_requests"))
        if idle or time.monotonic() > deadline:
            return current
        time.sleep(0.05)


def wait_for(url: str, key: str, value: int, timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    while state(url)[key] < value:
        assert time.monotonic() < deadline, f"{key} never reached {value}: {state(url)}"
        time.sleep(0.02)


def chat_body(model: str, max_tokens: int, stream: bool) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "Count to fifty."}],
            "max_tokens": max_tokens, "ignore_eos": True, "temperature": 0, "stream": stream}


def test_load_generator_streams_with_no_errors(api_server):
    """CI-sized run of `litedeploy bench serving` (the 200 x 64 run is done by hand)."""
    import argparse

    from litedeploy.cli.bench_serving import add_serving_parser

    idle = metric_values(api_server.url)
    parser = argparse.ArgumentParser()
    add_serving_parser(parser.add_subparsers())
    args = parser.parse_args(["serving", "--url", api_server.url, "--num-prompts", "40",
                              "--max-concurrency", "16", "--max-tokens", "8"])
    from litedeploy.bench.serving import run_serving

    result = run_serving(args.url, args.num_prompts, args.request_rate, args.max_concurrency,
                         max_tokens=args.max_tokens)
    assert result["errors"] == 0, result["error_samples"]
    assert result["completed"] == 40 and result["peak_concurrency"] == 16
    assert result["total_output_tokens"] == 40 * 8
    assert 0 < result["ttft_ms"]["p50"] <= result["ttft_ms"]["p99"]
    assert result["tpot_ms"]["mean"] > 0 and result["output_throughput_tok_per_s"] > 0
    after = metric_values(api_server.url)
    assert after["litedeploy:num_requests_running"] == 0
    assert after["litedeploy:num_requests_waiting"] == 0
    assert after["litedeploy:kv_cache_usage_perc"] == idle["litedeploy:kv_cache_usage_perc"]


def test_full_waiting_queue_gets_503_then_recovers(debug_server, model):
    url = debug_server.url + "/v1/chat/completions"
    queued: dict[str, httpx.Response] = {}
    with httpx.stream("POST", url, json=chat_body(model, 200, True), timeout=60) as running:
        lines = running.iter_lines()
        next(lines)  # generating; the one slot of the batch is taken
        waiter = threading.Thread(target=lambda: queued.setdefault(
            "reply", httpx.post(url, json=chat_body(model, 2, False), timeout=60)))
        waiter.start()
        wait_for(debug_server.url, "num_queued", 1)
        start = time.monotonic()
        refused = httpx.post(url, json=chat_body(model, 2, False), timeout=60)
        assert time.monotonic() - start < 1.0  # at once, not after a timeout
        assert "max-waiting-requests" in assert_envelope(refused, 503)
        assert refused.headers["retry-after"] == "1"
    waiter.join(timeout=60)  # the stream was dropped: the queued request runs and finishes
    assert queued["reply"].status_code == 200, queued["reply"].text
    again = httpx.post(url, json=chat_body(model, 2, False), timeout=60)
    assert again.status_code == 200 and again.json()["usage"]["completion_tokens"] == 2
    assert wait_idle(debug_server.url)["integrity"] == "ok"


def _abrupt_close(sock: socket.socket) -> None:
    """RST instead of FIN: the client vanishes as a crashed process or a dropped network would."""
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    sock.close()


def _request_bytes(port: int, body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: 127.0.0.1:{port}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n").encode() + data


def _disconnect_once(port: int, body: dict, when: int) -> None:
    """when 0: right after sending; 1: after the response head; 2+: after a few events."""
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(_request_bytes(port, body))
    received, num_events = b"", 2 * (when - 1) + (when == 1)
    while when and received.count(b"data: ") < num_events:
        data = sock.recv(4096)
        assert data, f"the server closed the connection: {received!r}"
        received += data
    _abrupt_close(sock)


def test_100_abrupt_disconnects_leak_nothing(debug_server, model):
    port = int(debug_server.url.rsplit(":", 1)[1])
    before = wait_idle(debug_server.url)
    assert before["integrity"] == "ok" and before["num_free_blocks"] == before["num_blocks"]
    stream, full = chat_body(model, 64, True), chat_body(model, 64, False)
    for i in range(NUM_DISCONNECTS):
        # every tenth request waits for a whole reply (not streamed) and is dropped mid-way
        body, when = (full, 0) if i % 10 == 9 else (stream, i % 4)
        _disconnect_once(port, body, when)
        wait_idle(debug_server.url)  # the abort lands before the next one (one waiting slot)
    after = wait_idle(debug_server.url)
    assert after["integrity"] == "ok"
    for key in ("num_free_blocks", "num_asyncio_tasks", "num_engine_streams",
                "num_engine_requests", "num_running", "num_waiting", "num_queued",
                "num_in_flight"):
        assert after[key] == before[key], (key, before, after)
    reply = httpx.post(debug_server.url + "/v1/chat/completions",
                       json=chat_body(model, 3, False), timeout=60)
    assert reply.status_code == 200


def test_half_sent_body_gets_408_and_holds_nothing(debug_server):
    port = int(debug_server.url.rsplit(":", 1)[1])
    before = wait_idle(debug_server.url)
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 500\r\n\r\n{\"model\": ")
        start = time.monotonic()
        answer = b""
        while b"}}" not in answer and (data := sock.recv(4096)):  # head and body may split
            answer += data
        elapsed_s = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408") and b'"error"' in answer
    assert READ_TIMEOUT_S - 0.2 < elapsed_s < READ_TIMEOUT_S + 3
    after = wait_idle(debug_server.url)
    assert after["num_asyncio_tasks"] == before["num_asyncio_tasks"]


@pytest.mark.parametrize("sent", [b"", b"POST /v1/completions HTTP/1.1\r\nHost: x\r\n"],
                         ids=["nothing", "half a head"])
def test_silent_clients_are_cut_off(debug_server, sent):
    port = int(debug_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(sent)
        start = time.monotonic()
        assert sock.recv(4096) == b""  # closed by the server, not by our 10 s timeout
        assert time.monotonic() - start < READ_TIMEOUT_S + 3


def test_idle_keep_alive_connection_is_closed(debug_server):
    port = int(debug_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert sock.recv(4096).startswith(b"HTTP/1.1 200")
        start = time.monotonic()
        assert sock.recv(4096) == b""
        assert time.monotonic() - start < 3  # --timeout-keep-alive 1


def test_injected_step_fault_fails_only_that_step(debug_server, model):
    url = debug_server.url + "/v1/chat/completions"
    replies: dict[str, httpx.Response] = {}
    with httpx.stream("POST", url, json=chat_body(model, 200, True), timeout=60) as running:
        lines = running.iter_lines()
        next(lines)
        waiter = threading.Thread(target=lambda: replies.setdefault(
            "queued", httpx.post(url, json=chat_body(model, 4, False), timeout=60)))
        waiter.start()
        wait_for(debug_server.url, "num_queued", 1)
        assert httpx.post(debug_server.url + "/debug/fail_next_step").json() == {"armed": True}
        events = [line for line in lines if line.startswith("data: ")]
    error = json.loads(events[-2].removeprefix("data: "))  # then [DONE]
    assert error["error"]["type"] == "server_error" and "InjectedFault" in \
        error["error"]["message"] and events[-1] == "data: [DONE]"
    waiter.join(timeout=60)  # not in the failed step: it is served
    assert replies["queued"].status_code == 200, replies["queued"].text
    # a non-streamed request in a failing step gets a 500 in OpenAI's envelope
    failing = threading.Thread(target=lambda: replies.setdefault(
        "failed", httpx.post(url, json=chat_body(model, 200, False), timeout=60)))
    failing.start()
    wait_for(debug_server.url, "num_running", 1)
    httpx.post(debug_server.url + "/debug/fail_next_step")
    failing.join(timeout=60)
    assert "InjectedFault" in assert_envelope(replies["failed"], 500)
    assert wait_idle(debug_server.url)["integrity"] == "ok"
    assert httpx.post(url, json=chat_body(model, 2, False), timeout=60).status_code == 200


def test_sigterm_drains_then_exits_0(debug_server, model):
    """Last in this module: the server exits."""
    url = debug_server.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=chat_body(model, 40, True), timeout=60) as running:
        lines = running.iter_lines()
        next(lines)
        debug_server.proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + 5
        while httpx.get(debug_server.url + "/health").status_code != 503:
            assert time.monotonic() < deadline
            time.sleep(0.05)
        refused = httpx.post(url, json=chat_body(model, 2, False), timeout=10)
        assert "shutting down" in assert_envelope(refused, 503)
        assert refused.headers["retry-after"] == "1"
        events = [line for line in lines if line.startswith("data: ")]
    finish = json.loads(events[-2].removeprefix("data: "))
    assert finish["choices"][0]["finish_reason"] == "length"  # all 40 tokens, not cut
    assert debug_server.proc.wait(timeout=30) == 0
    assert "draining 1 request" in debug_server.log()
