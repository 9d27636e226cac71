"""Findings of a hostile probe of the api_server, each checked against one real server.

The server runs one sequence per step (`--max-batch-size 1`), so a second request waits for its
first token while the first generates; three generations in flight at most; short body and drain
timeouts. The last test sends SIGTERM: the server exits.
"""

from __future__ import annotations

import json
import re
import signal
import socket
import threading
import time

import httpx
import pytest

from tests.serve.conftest import free_port, start_litedeploy, wait_until_ready
from tests.serve.test_api_server import assert_envelope

KEY = "sk-probe"
AUTH = {"Authorization": f"Bearer {KEY}"}
BODY_TIMEOUT_S = 3.0
READ_TIMEOUT_S = 1.5
MB = 2**20


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    port = free_port()
    proc = start_litedeploy(
        ["serve", "api_server", "--server-port", str(port), "--cache-max-tokens", "65536",
         "--session-len", "4096", "--max-batch-size", "1", "--max-concurrent-requests", "3",
         "--enable-debug-endpoints", "--api-keys", KEY,
         "--request-read-timeout", str(READ_TIMEOUT_S),
         "--request-body-timeout", str(BODY_TIMEOUT_S), "--drain-timeout", "1",
         "--log-level", "INFO"],
        port, tmp_path_factory.mktemp("probe") / "server.log")
    try:
        wait_until_ready(proc)
        yield proc
    finally:
        proc.stop()


@pytest.fixture(scope="module")
def model(server) -> str:
    return httpx.get(server.url + "/v1/models", headers=AUTH).json()["data"][0]["id"]


def state(url: str) -> dict:
    return httpx.get(url + "/debug/state", headers=AUTH, timeout=30).json()


def wait_state(url: str, timeout_s: float, **expected: int) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        current = state(url)
        if all(current[key] == value for key, value in expected.items()):
            return current
        assert time.monotonic() < deadline, f"not {expected} after {timeout_s} s: {current}"
        time.sleep(0.02)


def chat(model: str, content: str = "Count to fifty.", max_tokens: int = 2,
         stream: bool = False, **extra) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": content}],
            "max_tokens": max_tokens, "temperature": 0, "stream": stream, **extra}


def raw_request(port: int, path: str, body: dict) -> socket.socket:
    data = json.dumps(body).encode()
    sock = socket.create_connection(("127.0.0.1", port), timeout=30)
    sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {KEY}\r\n"
                 f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n".encode()
                 + data)
    return sock


def port_of(server) -> int:
    return int(server.url.rsplit(":", 1)[1])


def long_prompt(num_words: int) -> str:
    return " ".join(f"w{i % 97}" for i in range(num_words))


def test_head_health(server):
    assert httpx.head(server.url + "/health").status_code == 200


@pytest.mark.parametrize("order", ["valid first", "valid last"])
def test_duplicate_authorization_headers_are_refused(server, order):
    headers = [("Authorization", f"Bearer {KEY}"), ("Authorization", "Bearer sk-wrong")]
    if order == "valid last":
        headers.reverse()
    reply = httpx.get(server.url + "/v1/models", headers=headers)
    assert "one Authorization header" in assert_envelope(reply, 401)


def test_openai_fields_and_roles(server, model):
    url = server.url + "/v1/chat/completions"
    body = chat(model, store=True, metadata={"team": "probe"})
    body["messages"] += [{"role": "function", "name": "lookup", "content": "42"}]
    assert httpx.post(url, json=body, headers=AUTH, timeout=240).status_code == 200
    for message in ({"role": "user", "content": None}, {"role": "user"},
                    {"role": "system", "content": None}):
        reply = httpx.post(url, json={**chat(model), "messages": [message]}, headers=AUTH)
        assert "content" in assert_envelope(reply, 400)


@pytest.mark.parametrize("path,raw", [
    ("/v1/chat/completions",
     '{"model": MODEL, "messages": [{"role": "user", "content": "hi \\ud800 there"}]}'),
    ("/v1/completions", '{"model": MODEL, "prompt": "hi \\udfff"}'),
    ("/v1/encode", '{"input": ["ok", "\\ud83d"]}'),
])
def test_lone_surrogate_gets_a_clear_400(server, model, path, raw):
    raw = raw.replace("MODEL", json.dumps(model))
    reply = httpx.post(server.url + path, content=raw.encode(), timeout=240,
                       headers={**AUTH, "Content-Type": "application/json"})
    message = assert_envelope(reply, 400)
    assert "surrogate" in message and "TextEncodeInput" not in message, message


def test_tiny_temperature_is_greedy(server, model):
    url = server.url + "/v1/chat/completions"
    texts = [httpx.post(url, json=chat(model, "Say hi", 8, temperature=t), headers=AUTH,
                        timeout=240).json()["choices"][0]["message"]["content"]
             for t in (0, 1e-300)]
    assert texts[0] == texts[1] and "<|endoftext|>" not in texts[1]


def test_prompts_are_cut_in_the_log_by_default(server, model):
    prompt = "A" * 600 + "ZZ-END-OF-PROMPT"  # past the 256-char default, short to prefill
    reply = httpx.post(server.url + "/v1/chat/completions", json=chat(model, prompt, 1),
                       headers=AUTH, timeout=240)
    assert reply.status_code == 200
    log = server.log()
    assert "ZZ-END-OF-PROMPT" not in log and "more chars" in log


def test_a_trickled_body_gets_408_at_the_body_deadline(server):
    """One byte per second never trips the per-read timeout (1.5 s); the whole body has 3 s."""
    with socket.create_connection(("127.0.0.1", port_of(server)), timeout=10) as sock:
        sock.sendall(f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {KEY}"
                     "\r\nContent-Type: application/json\r\nContent-Length: 100\r\n\r\n".encode())
        start, answer = time.monotonic(), b""
        sock.settimeout(1.0)
        while b"}}" not in answer and time.monotonic() - start < 3 * BODY_TIMEOUT_S:
            try:
                sock.sendall(b" ")
                answer += sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                break
        elapsed_s = time.monotonic() - start
    assert answer.startswith(b"HTTP/1.1 408"), answer
    assert BODY_TIMEOUT_S - 0.2 < elapsed_s < BODY_TIMEOUT_S + 2.5


def test_debug_state_answers_during_a_long_prefill(server, model):
    """/debug/state reads state the engine thread publishes; it does not wait for a step."""
    replies: dict[str, float] = {}

    def prefill() -> None:
        start = time.monotonic()
        reply = httpx.post(server.url + "/v1/completions", headers=AUTH, timeout=600, json={
            "model": model, "prompt": long_prompt(400), "max_tokens": 1})
        replies["elapsed_s"] = time.monotonic() - start
        replies["status"] = reply.status_code

    thread = threading.Thread(target=prefill)
    latencies = []
    thread.start()
    while thread.is_alive():
        start = time.monotonic()
        state(server.url)
        latencies.append(time.monotonic() - start)
        time.sleep(0.02)
    thread.join()
    assert replies["status"] == 200 and replies["elapsed_s"] > 0.5, replies
    assert max(latencies) < max(0.3, replies["elapsed_s"] / 4), (max(latencies), replies)


def test_clients_that_hang_up_before_their_first_token_free_their_slot(server, model):
    """Two rounds of two clients (one streamed, one not) that wait behind a running stream and
    hang up: each round is back to one request in flight within two seconds."""
    url = server.url + "/v1/chat/completions"
    with httpx.stream("POST", url, json=chat(model, max_tokens=2000, stream=True,
                                             ignore_eos=True), headers=AUTH, timeout=240) as run:
        lines = run.iter_lines()
        next(lines)
        for _ in range(2):
            socks = [raw_request(port_of(server), "/v1/chat/completions",
                                 chat(model, long_prompt(200), 4, stream=stream))
                     for stream in (True, False)]
            wait_state(server.url, 30, num_queued=2, num_in_flight=3)
            for sock in socks:
                sock.close()
            wait_state(server.url, 2.0, num_queued=0, num_in_flight=1, num_engine_requests=1,
                       num_engine_streams=1)
        replies: dict[str, httpx.Response] = {}
        waiter = threading.Thread(target=lambda: replies.setdefault(
            "real", httpx.post(url, json=chat(model), headers=AUTH, timeout=240)))
        waiter.start()  # a real client gets a slot (not 503) and waits its turn
        wait_state(server.url, 10, num_in_flight=2)
    waiter.join(timeout=240)
    assert replies["real"].status_code == 200
    idle = wait_state(server.url, 10, num_in_flight=0, num_engine_requests=0)
    assert idle["integrity"] == "ok" and idle["num_free_blocks"] == idle["num_blocks"]


def _rss_bytes(pid: int) -> int:
    with open(f"/proc/{pid}/status") as status:
        return next(int(line.split()[1]) * 1024 for line in status if line.startswith("VmRSS"))


def test_sequential_requests_leave_rss_flat(server, model):
    """A FIFO free list handed each request blocks no request had touched: every one mapped
    fresh pages of the lazily allocated cache (here ~0.5 MB a request, +118 MiB over these 250;
    a whole ~2.9 MB block for prompts of 64+ tokens) until all of it was resident."""
    rss = {}
    with httpx.Client(headers=AUTH, timeout=240) as client:
        for i in range(300):
            reply = client.post(server.url + "/v1/completions", json={
                "model": model, "prompt": f"Item {i}: the", "max_tokens": 1})
            assert reply.status_code == 200
            if i in (49, 299):
                rss[i] = _rss_bytes(server.proc.pid)
    growth = rss[299] - rss[49]
    print(f"RSS after 50 requests {rss[49] / MB:.0f} MiB, after 300 {rss[299] / MB:.0f} MiB")
    assert growth < 16 * MB, f"RSS grew {growth / MB:.0f} MiB over 250 requests"


def test_sigterm_past_the_drain_timeout(server, model):
    """Last: the server exits. A stream still running at the 1 s drain deadline ends with an
    error event and [DONE]; clients still waiting for a first token get a 503 envelope; the
    process exits 0 with one log line per cancelled request and no traceback."""
    url = server.url + "/v1/chat/completions"
    replies: dict[str, httpx.Response] = {}

    def waiting(name: str, stream: bool) -> None:
        body = chat(model, long_prompt(1000), 4, stream=stream)
        with httpx.stream("POST", url, json=body, headers=AUTH, timeout=240) as reply:
            reply.read()
            replies[name] = reply

    with httpx.stream("POST", url, json=chat(model, max_tokens=2000, stream=True,
                                             ignore_eos=True), headers=AUTH, timeout=240) as run:
        lines = run.iter_lines()
        next(lines)
        waiters = [threading.Thread(target=waiting, args=(name, name == "streamed"))
                   for name in ("streamed", "whole")]
        for thread in waiters:
            thread.start()
        wait_state(server.url, 30, num_queued=2)
        server.proc.send_signal(signal.SIGTERM)
        events = [line for line in lines if line.startswith("data: ")]
    error = json.loads(events[-2].removeprefix("data: "))
    assert events[-1] == "data: [DONE]"
    assert error["error"]["type"] == "server_error" and "shut" in error["error"]["message"]
    for thread in waiters:
        thread.join(timeout=30)
    for name in ("streamed", "whole"):
        assert "shut" in assert_envelope(replies[name], 503)
    assert server.proc.wait(timeout=240) == 0
    log = server.log()
    assert "Traceback" not in log and "terminate called" not in log
    assert len(re.findall(r"cancelled by the shutdown", log)) == 3, log[-3000:]
