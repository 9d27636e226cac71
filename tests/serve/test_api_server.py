"""`litedeploy serve api_server` against the official openai client and raw HTTP."""

from __future__ import annotations

import subprocess
import sys
import time

import httpx
import pytest

from tests.serve.conftest import (
    API_KEY,
    KEYED_MODEL_NAME,
    OPEN_SESSION_LEN,
    REPO_ROOT,
    subprocess_env,
)

openai = pytest.importorskip("openai")

MESSAGES = [{"role": "system", "content": "You are a helpful assistant."},
            {"role": "user", "content": "Tell me a short story about a cat."}]


@pytest.fixture(scope="module")
def client(api_server):
    return openai.OpenAI(base_url=api_server.url + "/v1", api_key="EMPTY", max_retries=0,
                         timeout=120)


@pytest.fixture(scope="module")
def model(client) -> str:
    return client.models.list().data[0].id


def metric_values(url: str, headers: dict | None = None) -> dict[str, float]:
    from prometheus_client.parser import text_string_to_metric_families

    text = httpx.get(url + "/metrics", headers=headers).text
    return {sample.name: sample.value for family in text_string_to_metric_families(text)
            for sample in family.samples}


def assert_envelope(response: httpx.Response, status: int) -> str:
    assert response.status_code == status, response.text
    body = response.json()
    assert list(body) == ["error"]
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"] and "Traceback" not in response.text
    return body["error"]["message"]


def test_models_list(client, model, api_server):
    assert model.startswith("SmolLM2-135M-Instruct")  # default: the model file's name
    card = httpx.get(api_server.url + "/v1/models").json()["data"][0]
    assert card["object"] == "model" and card["owned_by"] == "litedeploy"
    assert card["max_model_len"] == OPEN_SESSION_LEN and card["device"] == "cpu"


def test_chat_stream_equals_non_stream_for_a_seed(client, model):
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 20, "seed": 1234,
              "temperature": 0.9}
    full = client.chat.completions.create(**kwargs)
    assert full.id.startswith("chatcmpl-") and full.object == "chat.completion"
    assert full.choices[0].message.role == "assistant" and full.choices[0].message.content
    assert full.choices[0].finish_reason in ("stop", "length") and full.model == model
    chunks = list(client.chat.completions.create(**kwargs, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {chunk.id for chunk in chunks} == {chunks[0].id}
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    reasons = [c.choices[0].finish_reason for c in chunks if c.choices and
               c.choices[0].finish_reason]
    assert reasons == [full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and all(c.usage is None for c in chunks[:-1])
    usage = chunks[-1].usage
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == (
        full.usage.prompt_tokens, full.usage.completion_tokens, full.usage.total_tokens)


def test_n_fans_out_with_one_seed_per_choice(client, model):
    kwargs = {"model": model, "messages": MESSAGES, "max_tokens": 12, "seed": 99,
              "temperature": 1.0}
    many = client.chat.completions.create(**kwargs, n=3)
    assert [choice.index for choice in many.choices] == [0, 1, 2]
    assert len({choice.message.content for choice in many.choices}) > 1
    single = client.chat.completions.create(**kwargs)  # choice j samples with seed + j
    assert single.choices[0].message.content == many.choices[0].message.content
    assert many.usage.prompt_tokens == single.usage.prompt_tokens
    assert many.usage.completion_tokens > single.usage.completion_tokens


def test_completions_string_ids_and_echo(client, model, api_server):
    prompt = "Once upon a time"
    echoed = client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                       echo=True)
    assert echoed.id.startswith("cmpl-") and echoed.object == "text_completion"
    assert echoed.choices[0].text.startswith(prompt) and echoed.usage.completion_tokens == 8
    assert echoed.choices[0].finish_reason == "length"
    encoded = httpx.post(api_server.url + "/v1/encode", json={"input": prompt}).json()
    assert encoded["length"] == len(encoded["input_ids"]) == echoed.usage.prompt_tokens
    both = client.completions.create(model=model, prompt=[prompt, encoded["input_ids"]],
                                     max_tokens=8, temperature=0)
    texts = [choice.text for choice in sorted(both.choices, key=lambda c: c.index)]
    assert texts == [echoed.choices[0].text[len(prompt):]] * 2  # same ids, greedy: same text
    assert both.usage.prompt_tokens == 2 * echoed.usage.prompt_tokens


def test_every_sampling_field_is_accepted(client, model):
    reply = client.chat.completions.create(
        model=model, messages=[{"role": "user", "content": [{"type": "text", "text": "Hi"}]}],
        max_completion_tokens=3, temperature=0.5, top_p=0.9, seed=5, presence_penalty=0.5,
        frequency_penalty=0.5, user="tester", stop=["\n\n\n"], response_format={"type": "text"},
        extra_body={"top_k": 20, "min_p": 0.05, "repetition_penalty": 1.1, "ignore_eos": True,
                    "skip_special_tokens": False})
    assert reply.usage.completion_tokens == 3 and reply.choices[0].finish_reason == "length"


def test_encode_list_and_chat_template(api_server):
    reply = httpx.post(api_server.url + "/v1/encode",
                       json={"input": ["hi", "hello there"], "do_preprocess": True}).json()
    assert reply["length"] == [len(ids) for ids in reply["input_ids"]]
    plain = httpx.post(api_server.url + "/v1/encode", json={"input": "hi", "add_bos": False})
    assert reply["length"][0] > plain.json()["length"]  # the template adds its markup


def _stop_in_middle(text: str) -> tuple[str, int]:
    """A stop string of several characters whose first occurrence is mid-text."""
    for start in range(4, len(text) - 6):
        word = text[start:start + 6]
        if word.strip() and text.find(word) == start:
            return word, start
    raise AssertionError(f"no usable stop string in {text!r}")


def test_stop_strings_non_streaming_and_streaming(client, model):
    base = client.completions.create(model=model, prompt="The three primary colors are",
                                     max_tokens=24, temperature=0)
    word, start = _stop_in_middle(base.choices[0].text)
    cut = client.completions.create(model=model, prompt="The three primary colors are",
                                    max_tokens=24, temperature=0, stop=["never-seen", word])
    assert cut.choices[0].text == base.choices[0].text[:start]
    assert cut.choices[0].finish_reason == "stop"
    chat = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                          temperature=0).choices[0].message.content
    word, start = _stop_in_middle(chat)
    stream = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=24,
                                            temperature=0, stop=word, stream=True)
    chunks = list(stream)
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == chat[:start]
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_logprobs_chat_and_completions(client, model):
    reply = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                           temperature=0, logprobs=True, top_logprobs=3)
    content = reply.choices[0].logprobs.content
    assert len(content) == reply.usage.completion_tokens
    assert "".join(token.token for token in content) == reply.choices[0].message.content
    for token in content:
        top = [alt.logprob for alt in token.top_logprobs]
        assert len(top) == 3 and top == sorted(top, reverse=True) and token.logprob <= 0
        # greedy picks a best token: the default model's logits are bfloat16 values, so the top
        # two can tie exactly, and then the listed order is not the sampler's (lowest id) pick
        assert token.top_logprobs[0].logprob == token.logprob
        assert token.bytes == list(token.token.encode())
    completion = client.completions.create(model=model, prompt="1, 2, 3,", max_tokens=6,
                                           temperature=0, logprobs=2)
    logprobs = completion.choices[0].logprobs
    assert len(logprobs.tokens) == len(logprobs.token_logprobs) == 6
    assert all(1 <= len(top) <= 2 for top in logprobs.top_logprobs)
    assert logprobs.text_offset == sorted(logprobs.text_offset)


def test_raw_sse_stream_of_completions(api_server, model):
    body = {"model": model, "prompt": ["Hi", "Bye"], "max_tokens": 4, "stream": True,
            "temperature": 0}
    with httpx.stream("POST", api_server.url + "/v1/completions", json=body) as response:
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    import json

    chunks = [json.loads(line[6:]) for line in lines[:-1]]
    finished = sorted(c["choices"][0]["index"] for c in chunks if c["choices"][0]["finish_reason"])
    assert finished == [0, 1] and all(c["object"] == "text_completion" for c in chunks)


def test_tutorial_demo_api_script(api_server, tmp_path):
    demo = '''from openai import OpenAI
client = OpenAI(
    api_key='EMPTY',
    base_url="http://0.0.0.0:23333/v1"
)
model_name = client.models.list().data[0].id
response = client.chat.completions.create(
  model=model_name,
  messages=[
    {"role": "system", "content": "You are a helpful assistant."},
    {"role": "user", "content": "请你给我讲一个 300 字的小故事。"},
  ],
    temperature=0.8,
    top_p=0.8
)
print(response)
'''.replace("http://0.0.0.0:23333/v1", api_server.url + "/v1")
    (tmp_path / "demo_api.py").write_text(demo)
    result = subprocess.run([sys.executable, "demo_api.py"], cwd=tmp_path, env=subprocess_env(),
                            capture_output=True, text=True, timeout=180, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("ChatCompletion(id='chatcmpl-")
    assert "role='assistant'" in result.stdout and "finish_reason=" in result.stdout


BAD_REQUESTS = [  # (case, path, raw body, status, words the message must contain)
    ("malformed json", "/v1/chat/completions", b'{"model": "m", "messages": [', 400, "JSON"),
    ("not an object", "/v1/chat/completions", b"[1, 2]", 400, "JSON object"),
    ("wrong type", "/v1/chat/completions", {"temperature": "hot"}, 400, "temperature"),
    ("bad role", "/v1/chat/completions", {"messages": [{"role": "bot", "content": "x"}]}, 400,
     "role"),
    ("image part", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     400, "image_url"),
    ("unknown model", "/v1/chat/completions", {"model": "gpt-4"}, 404, "gpt-4"),
    ("zero max_tokens", "/v1/chat/completions", {"max_tokens": 0}, 400, "max_tokens"),
    ("negative max_tokens", "/v1/completions", {"max_tokens": -3}, 400, "max_tokens"),
    ("tool_choice not in tools", "/v1/chat/completions",
     {"tools": [{"type": "function", "function": {"name": "f"}}],
      "tool_choice": {"type": "function", "function": {"name": "g"}}}, 400, "not in tools"),
    ("unknown response_format", "/v1/chat/completions", {"response_format": {"type": "xml"}},
     400, "response_format"),
    ("unknown field", "/v1/chat/completions", {"best_friend": 1}, 400, "best_friend"),
    ("suffix", "/v1/completions", {"suffix": "end"}, 400, "suffix"),
    ("empty stop", "/v1/completions", {"stop": [""]}, 400, "stop"),
    ("top_logprobs alone", "/v1/chat/completions", {"top_logprobs": 2}, 400, "logprobs"),
    ("over-long prompt", "/v1/completions", {"prompt": "hello " * 400, "max_tokens": 8}, 400,
     str(OPEN_SESSION_LEN)),
    ("over-long stream", "/v1/chat/completions",
     {"messages": [{"role": "user", "content": "hi " * 400}], "stream": True}, 400,
     str(OPEN_SESSION_LEN)),
]


@pytest.mark.parametrize("case,path,body,status,words", BAD_REQUESTS,
                         ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_errors(api_server, model, case, path, body, status, words):
    if isinstance(body, dict):
        defaults = {"model": model, "max_tokens": 4}
        defaults.update({"messages": [{"role": "user", "content": "hi"}]} if "chat" in path
                        else {"prompt": "hi"})
        body = {**defaults, **body}
        response = httpx.post(api_server.url + path, json=body, timeout=60)
    else:
        response = httpx.post(api_server.url + path, content=body, timeout=60,
                              headers={"content-type": "application/json"})
    assert words in assert_envelope(response, status)


def test_body_over_the_limit_is_413(api_server):
    from litedeploy.serve.guards import MAX_REQUEST_BYTES

    body = b'{"model": "' + b"x" * MAX_REQUEST_BYTES + b'"}'
    response = httpx.post(api_server.url + "/v1/completions", content=body, timeout=60)
    assert "limit" in assert_envelope(response, 413)


def test_server_still_answers_after_errors(client, model):
    reply = client.completions.create(model=model, prompt="Hello", max_tokens=2)
    assert reply.usage.completion_tokens == 2


def test_cors_preflight(api_server):
    response = httpx.options(api_server.url + "/v1/chat/completions", headers={
        "Origin": "http://example.com", "Access-Control-Request-Method": "POST"})
    assert response.status_code == 200
    assert response.headers["access-control-allow-origin"] in ("*", "http://example.com")


def test_api_keys(keyed_server):
    url = keyed_server.url
    assert httpx.get(url + "/health").status_code == 200  # exempt
    assert "missing" in assert_envelope(httpx.get(url + "/v1/models"), 401)
    wrong = httpx.get(url + "/v1/models", headers={"Authorization": "Bearer nope"})
    assert "invalid" in assert_envelope(wrong, 401)
    assert wrong.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url + "/v1", api_key="nope", max_retries=0).models.list()
    good = openai.OpenAI(base_url=url + "/v1", api_key=API_KEY, max_retries=0)
    assert good.models.list().data[0].id == KEYED_MODEL_NAME


def test_overload_gets_503_with_retry_after(keyed_server):
    headers = {"Authorization": f"Bearer {API_KEY}"}
    body = {"model": KEYED_MODEL_NAME, "prompt": "Count:", "max_tokens": 400, "stream": True,
            "ignore_eos": True}
    url = keyed_server.url + "/v1/completions"
    with httpx.stream("POST", url, json=body, headers=headers, timeout=60) as first:
        lines = first.iter_lines()  # keep a reference: a dropped iterator closes the stream
        next(lines)  # the first request is generating
        second = httpx.post(url, json={**body, "stream": False}, headers=headers)
        assert "max-concurrent-requests" in assert_envelope(second, 503)
        assert second.headers["retry-after"] == "1"
    deadline = time.monotonic() + 10
    while True:  # the slot frees once the first response has ended
        third = httpx.post(url, json={**body, "stream": False, "max_tokens": 2}, headers=headers)
        if third.status_code != 503 or time.monotonic() > deadline:
            break
        time.sleep(0.1)
    assert third.status_code == 200, third.text


def _wait_until_idle(url: str, idle: dict[str, float]) -> dict[str, float]:
    # an upper bound only (it returns once idle): the abort lands at the end of the running step,
    # and a CPU on PyTorch's scalar kernels (ATEN_CPU_CAPABILITY=default) takes seconds for one
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        after = metric_values(url)
        if after["litedeploy:num_requests_running"] == 0 and \
                after["litedeploy:kv_cache_usage_perc"] == idle["litedeploy:kv_cache_usage_perc"]:
            break
        time.sleep(0.05)
    return after


def test_disconnect_mid_stream_frees_the_request(api_server, model):
    idle = metric_values(api_server.url)
    assert idle["litedeploy:num_requests_running"] == 0
    body = {"model": model, "messages": MESSAGES, "max_tokens": 120, "ignore_eos": True,
            "stream": True}
    with httpx.stream("POST", api_server.url + "/v1/chat/completions", json=body,
                      timeout=120) as response:  # a slow CPU's prefill is not what is tested
        lines = response.iter_lines()
        for _ in range(6):  # role chunk, then a few tokens
            next(lines)
        busy = metric_values(api_server.url)
        assert busy["litedeploy:num_requests_running"] == 1
        assert busy["litedeploy:kv_cache_usage_perc"] > idle["litedeploy:kv_cache_usage_perc"]
    after = _wait_until_idle(api_server.url, idle)
    assert after["litedeploy:num_requests_running"] == 0
    assert after["litedeploy:kv_cache_usage_perc"] == idle["litedeploy:kv_cache_usage_perc"]
    assert after["litedeploy:generation_tokens_total"] < idle[
        "litedeploy:generation_tokens_total"] + 120  # it did stop early


def test_disconnect_while_waiting_for_a_full_reply_frees_it(api_server, model):
    idle = metric_values(api_server.url)
    body = {"model": model, "prompt": "Count:", "max_tokens": 150, "ignore_eos": True}
    with pytest.raises(httpx.ReadTimeout):  # the client gives up and hangs up
        httpx.post(api_server.url + "/v1/completions", json=body,
                   timeout=httpx.Timeout(10, read=1.5))
    after = _wait_until_idle(api_server.url, idle)
    assert after["litedeploy:num_requests_running"] == 0
    assert after["litedeploy:kv_cache_usage_perc"] == idle["litedeploy:kv_cache_usage_perc"]
    assert after["litedeploy:generation_tokens_total"] < idle[
        "litedeploy:generation_tokens_total"] + 150


def test_metrics_are_prometheus(api_server):
    values = metric_values(api_server.url)
    for name in ("num_requests_waiting", "prefix_cache_hit_rate"):
        assert f"litedeploy:{name}" in values
    for name in ("time_to_first_token_seconds_count", "time_per_output_token_seconds_count",
                 "prompt_tokens_total", "generation_tokens_total"):
        assert values[f"litedeploy:{name}"] > 0


def test_api_client_chats_from_stdin(api_server):
    result = subprocess.run(
        [sys.executable, "-m", "litedeploy", "serve", "api_client", api_server.url,
         "--max-tokens", "6", "--temperature", "0"],
        input="Say hello\nexit\n", capture_output=True, text=True, timeout=120,
        cwd=REPO_ROOT, env=subprocess_env(), check=False)
    assert result.returncode == 0, result.stderr
    assert "assistant> " in result.stdout
    reply = result.stdout.split("assistant> ", 1)[1].strip()
    assert reply and "user> " in result.stdout


def test_a_taken_port_fails_fast_with_one_line():
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        result = subprocess.run(
            [sys.executable, "-m", "litedeploy", "serve", "api_server", "--server-port",
             str(port)], capture_output=True, text=True, timeout=60, cwd=REPO_ROOT,
            env=subprocess_env(), check=False)
    assert result.returncode == 2
    assert result.stderr.startswith("litedeploy: error: cannot listen on") and \
        str(port) in result.stderr and "Traceback" not in result.stderr
