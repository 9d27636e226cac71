"""Bad input: schemathesis fuzzes every endpoint of our /openapi.json (a bounded number of cases)
and must find no 5xx; hand-written hostile requests each get a 4xx in OpenAI's envelope, and the
server still answers /health after each."""

from __future__ import annotations

import socket
import time
from collections import Counter

import httpx
import pytest

from tests.serve.test_api_server import assert_envelope

schemathesis = pytest.importorskip("schemathesis")
from hypothesis import HealthCheck, settings

MAX_EXAMPLES_PER_OPERATION = 40  # per operation and mode (positive, negative)
GENERATION_PATHS = ("/v1/chat/completions", "/v1/completions")


@pytest.fixture(scope="module")
def model(api_server) -> str:
    return httpx.get(api_server.url + "/v1/models").json()["data"][0]["id"]


def _keep_cheap(case, model: str) -> None:
    """Half the generation cases name the served model (so they reach the engine); every one is
    capped to a few tokens and choices so the run stays short on a CPU."""
    body = case.body
    if case.path not in GENERATION_PATHS or not isinstance(body, dict):
        return
    if hash(repr(sorted(body))) % 2:
        body["model"] = model
    for key in ("max_tokens", "max_completion_tokens"):
        if isinstance(body.get(key), int) and not isinstance(body[key], bool):
            body[key] = max(-1, min(body[key], 3))
    body.setdefault("max_tokens", 3)
    if isinstance(body.get("n"), int) and not isinstance(body["n"], bool):
        body["n"] = min(body["n"], 2)


def test_fuzz_finds_no_server_error(api_server, model):
    """Valid (positive) and invalid (negative) cases for every operation of our own schema."""
    from hypothesis import given
    from hypothesis.errors import Unsatisfiable

    fuzz_schema = schemathesis.openapi.from_url(api_server.url + "/openapi.json")
    operations = [result.ok() for result in fuzz_schema.get_all_operations()]
    assert len(operations) >= 6
    statuses: Counter[int] = Counter()
    for operation in operations:
        for mode in (schemathesis.GenerationMode.POSITIVE, schemathesis.GenerationMode.NEGATIVE):
            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=MAX_EXAMPLES_PER_OPERATION, deadline=None, derandomize=True,
                      suppress_health_check=list(HealthCheck), database=None)
            def call(case):
                _keep_cheap(case, model)
                response = case.call(base_url=api_server.url, timeout=60)
                statuses[response.status_code] += 1
                assert response.status_code < 500, (case.as_curl_command(), response.text)
                if response.status_code >= 400:
                    assert set(response.json()["error"]) == {"message", "type", "param", "code"}

            try:
                call()
            except Unsatisfiable:  # no parameters (GET /health): nothing invalid to make
                assert mode == schemathesis.GenerationMode.NEGATIVE
    print(f"schemathesis {schemathesis.__version__}: {statuses.total()} cases, no 5xx, "
          f"statuses {dict(statuses)}")
    assert statuses[200] > 10 and statuses[400] > 10  # both served and refused cases were made
    assert httpx.get(api_server.url + "/health").status_code == 200


def _raw_post(url: str, path: str, body: bytes) -> httpx.Response:
    return httpx.post(url + path, content=body, timeout=60,
                      headers={"content-type": "application/json"})


def _chat(model: str, **fields) -> dict:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 2,
            **fields}


HOSTILE = {  # case -> (path, body maker (model -> bytes or dict), words in the message)
    "invalid utf-8": ("/v1/chat/completions", lambda m: b'{"model": "' + m.encode() +
                      b'", "messages": [{"role": "user", "content": "\xff\xfe"}]}', "UTF-8"),
    "deeply nested json": ("/v1/chat/completions",
                           lambda m: b'{"messages": ' + b"[" * 100_000 + b"]" * 100_000 + b"}",
                           "deeply"),
    "NaN temperature": ("/v1/chat/completions", lambda m: b'{"model": "' + m.encode() +
                        b'", "messages": [{"role": "user", "content": "hi"}], '
                        b'"temperature": NaN}', "finite"),
    "Infinity top_p": ("/v1/completions", lambda m: b'{"model": "' + m.encode() +
                       b'", "prompt": "hi", "top_p": Infinity}', "finite"),
    "huge n": ("/v1/chat/completions", lambda m: _chat(m, n=10**30), "n"),
    "top_logprobs 1000": ("/v1/chat/completions",
                          lambda m: _chat(m, logprobs=True, top_logprobs=1000), "top_logprobs"),
    "empty messages": ("/v1/chat/completions", lambda m: {"model": m, "messages": []},
                       "messages"),
    "unknown role": ("/v1/chat/completions", lambda m: {
        "model": m, "messages": [{"role": "wizard", "content": "hi"}]}, "role"),
    "1000 stop strings": ("/v1/chat/completions",
                          lambda m: _chat(m, stop=[f"s{i}" for i in range(1000)]), "stop"),
    "empty prompt": ("/v1/completions", lambda m: {"model": m, "prompt": ""}, "empty"),
    "token id out of vocabulary": ("/v1/completions",
                                   lambda m: {"model": m, "prompt": [10**9]}, "token ids"),
}


@pytest.mark.parametrize("case", list(HOSTILE))
def test_hostile_requests_get_4xx_envelopes(api_server, model, case):
    path, make, words = HOSTILE[case]
    body = make(model)
    response = (_raw_post(api_server.url, path, body) if isinstance(body, bytes)
                else httpx.post(api_server.url + path, json=body, timeout=60))
    assert words in assert_envelope(response, 400)
    assert httpx.get(api_server.url + "/health").status_code == 200


def test_prompt_of_only_special_tokens_is_served(api_server, model):
    """Special-token text is ordinary input (the template cannot tell): served, not crashed."""
    body = {"model": model, "prompt": "<|im_start|><|im_end|><|endoftext|>", "max_tokens": 2,
            "temperature": 0}
    response = httpx.post(api_server.url + "/v1/completions", json=body, timeout=60)
    assert response.status_code == 200 and response.json()["usage"]["completion_tokens"] >= 1
    chat = httpx.post(api_server.url + "/v1/chat/completions", timeout=60, json=_chat(
        model, messages=[{"role": "user", "content": "<|im_end|><|im_start|>system"}]))
    assert chat.status_code == 200


def test_50_mb_body_is_refused_before_it_is_read(api_server):
    port = int(api_server.url.rsplit(":", 1)[1])
    with socket.create_connection(("127.0.0.1", port), timeout=10) as sock:
        sock.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Type: "
                     b"application/json\r\nContent-Length: 52428800\r\n\r\n{\"model\": ")
        start = time.monotonic()
        answer = b""
        while b'"error"' not in answer:
            data = sock.recv(4096)
            assert data, answer
            answer += data
    assert answer.startswith(b"HTTP/1.1 413") and time.monotonic() - start < 2
    assert httpx.get(api_server.url + "/health").status_code == 200
