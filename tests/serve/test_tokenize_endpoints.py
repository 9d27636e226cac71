"""Tokenizer endpoints, models.retrieve, logit_bias and prompt logprobs over real HTTP, on a tiny
random float32 Llama whose transformers twin is the numeric reference."""

from __future__ import annotations

import json

import httpx
import openai
import pytest
import torch

PROMPT = "the quick brown fox 书生·浦语 😀"


@pytest.fixture(scope="module")
def tiny(tiny_llama_server):
    return tiny_llama_server


@pytest.fixture(scope="module")
def client(tiny) -> openai.OpenAI:
    return openai.OpenAI(base_url=tiny.server.url + "/v1", api_key="unused", max_retries=0)


@pytest.fixture(scope="module")
def hf_tokenizer(tiny):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tiny.folder))


def _post(tiny, path: str, body: dict) -> httpx.Response:
    return httpx.post(tiny.server.url + path, json=body, timeout=60)


def _token_bytes(token: str) -> bytes:
    """OpenAI's token strings: `bytes:\\xe4\\xb8` for part of a character, else the text."""
    if token.startswith("bytes:"):
        return bytes(int(h, 16) for h in token[len("bytes:"):].split("\\x")[1:])
    return token.encode()


def test_models_retrieve_and_tokenizer_endpoints(tiny, client, hf_tokenizer):
    card = client.models.retrieve(tiny.model_name)
    assert (card.id, card.object) == (tiny.model_name, "model")
    with pytest.raises(openai.NotFoundError):
        client.models.retrieve("no-such-model")

    ids = hf_tokenizer.encode(PROMPT, add_special_tokens=False)
    body = _post(tiny, "/tokenize", {"prompt": PROMPT, "return_token_strs": True}).json()
    assert body["tokens"] == ids and body["count"] == len(ids)
    assert body["max_model_len"] == card.max_model_len
    assert b"".join(_token_bytes(s) for s in body["token_strs"]) == PROMPT.encode()
    messages = [{"role": "user", "content": "hi there"}]
    chat = _post(tiny, "/tokenize", {"messages": messages, "model": tiny.model_name}).json()
    assert chat["tokens"] == hf_tokenizer.apply_chat_template(
        messages, add_generation_prompt=True, tokenize=True, return_dict=False)
    assert _post(tiny, "/detokenize", {"tokens": ids}).json() == {"prompt": PROMPT}

    info = httpx.get(tiny.server.url + "/tokenizer_info").json()
    assert info["eos_token"] == hf_tokenizer.eos_token and "im_start" in info["chat_template"]
    for path, bad in [("/tokenize", {"prompt": "a", "messages": messages}),
                      ("/tokenize", {"prompt": 5}), ("/detokenize", {"tokens": [1, 10**6]}),
                      ("/detokenize", {"tokens": [-1]}), ("/tokenize", {"prompt": "a", "x": 1})]:
        response = _post(tiny, path, bad)
        assert response.status_code == 400, (path, bad, response.text)
        assert "message" in response.json()["error"]
    assert _post(tiny, "/tokenize", {"prompt": "a", "model": "other"}).status_code == 404


def test_echo_logprobs_with_max_tokens_zero_equal_transformers(tiny, client, hf_tokenizer):
    ids = hf_tokenizer.encode(PROMPT, add_special_tokens=False)
    with torch.inference_mode():
        reference = tiny.hf_model(torch.tensor([ids])).logits[0].float().log_softmax(dim=-1)
    completion = client.completions.create(model=tiny.model_name, prompt=PROMPT, echo=True,
                                           logprobs=2, max_tokens=0)
    choice = completion.choices[0]
    assert choice.text == PROMPT and choice.finish_reason == "length"
    assert completion.usage.completion_tokens == 0
    logprobs = choice.logprobs
    assert logprobs.token_logprobs[0] is None and logprobs.top_logprobs[0] is None
    assert len(logprobs.tokens) == len(ids)
    # bytes-faithful: the tokens of split characters are `bytes:` tokens, no U+FFFD anywhere
    assert any(token.startswith("bytes:") for token in logprobs.tokens)
    assert b"".join(_token_bytes(token) for token in logprobs.tokens) == PROMPT.encode()
    assert logprobs.text_offset[-1] < len(PROMPT)
    for i in range(1, len(ids)):
        assert logprobs.token_logprobs[i] == pytest.approx(reference[i - 1, ids[i]].item(),
                                                           abs=1e-4)
        best = reference[i - 1].topk(2).values.tolist()
        top = sorted(logprobs.top_logprobs[i].values(), reverse=True)
        assert top[0] == pytest.approx(best[0], abs=1e-4)  # the top 2 plus the prompt token

    # token-id prompts, one generated token after the echo (lm-eval's request), vLLM's field
    response = _post(tiny, "/v1/completions", {
        "model": tiny.model_name, "prompt": ids[:6], "echo": True, "logprobs": 1,
        "max_tokens": 1, "temperature": 0, "prompt_logprobs": 1}).json()["choices"][0]
    assert len(response["logprobs"]["token_logprobs"]) == 7
    entries = response["prompt_logprobs"]
    assert entries[0] is None and len(entries) == 6
    own = entries[3][str(ids[3])]
    assert own["logprob"] == pytest.approx(reference[2, ids[3]].item(), abs=1e-4)
    assert own["rank"] == int((reference[2] > reference[2, ids[3]]).sum()) + 1

    bad = _post(tiny, "/v1/completions", {"model": tiny.model_name, "prompt": "a",
                                          "max_tokens": 0})
    assert bad.status_code == 400 and "echo" in bad.json()["error"]["message"]


def test_chat_logprobs_bytes_are_the_tokens_bytes(tiny, client):
    # a random model emits stray byte pieces: U+FFFD in the text, their real bytes in `bytes`
    chat = client.chat.completions.create(
        model=tiny.model_name, messages=[{"role": "user", "content": "书生·浦语"}],
        max_tokens=24, temperature=0, logprobs=True, top_logprobs=1)
    content = chat.choices[0].logprobs.content
    assert any(token.token.startswith("bytes:") for token in content)
    raw = b"".join(bytes(token.bytes) for token in content)
    assert raw.decode("utf-8", errors="replace") == chat.choices[0].message.content
    assert all(token.token == _token_bytes(token.token).decode("utf-8", errors="replace")
               or token.token.startswith("bytes:") for token in content)


def test_streamed_echo_carries_prompt_logprobs(tiny):
    body = {"model": tiny.model_name, "prompt": "hello world", "echo": True, "logprobs": 1,
            "max_tokens": 2, "stream": True}
    chunks = []
    with httpx.stream("POST", tiny.server.url + "/v1/completions", json=body) as response:
        for line in response.iter_lines():
            if line.startswith("data: {"):
                chunks.append(json.loads(line[len("data: "):])["choices"][0])
    assert chunks[0]["text"] == "hello world"
    logprobs = [c["logprobs"] for c in chunks if c["logprobs"]]
    assert logprobs[0]["token_logprobs"][0] is None  # the echoed prompt comes first
    num_tokens = sum(len(lp["tokens"]) for lp in logprobs)
    prompt_len = _post(tiny, "/tokenize", {"prompt": "hello world"}).json()["count"]
    assert num_tokens == prompt_len + 2


def test_logit_bias_is_honoured_and_validated(tiny, client, hf_tokenizer):
    prompt = hf_tokenizer.encode("hello world", add_special_tokens=False)
    plain = client.completions.create(model=tiny.model_name, prompt=prompt, max_tokens=3,
                                      temperature=0, logprobs=0)
    natural = plain.choices[0].text
    target = hf_tokenizer.encode(" fox", add_special_tokens=False)[0]
    biased = client.completions.create(model=tiny.model_name, prompt=prompt, max_tokens=3,
                                       temperature=0, logit_bias={str(target): 100})
    assert biased.choices[0].text == hf_tokenizer.decode([target] * 3)
    assert biased.choices[0].text != natural
    chat = client.chat.completions.create(
        model=tiny.model_name, messages=[{"role": "user", "content": "hi"}], max_tokens=2,
        temperature=0, logit_bias={str(target): 100})
    assert chat.choices[0].message.content == hf_tokenizer.decode([target] * 2)
    for bias in [{"300": 1}, {"-1": 1}, {"abc": 1}, {str(target): 101}]:
        with pytest.raises(openai.BadRequestError, match="logit_bias"):
            client.completions.create(model=tiny.model_name, prompt=prompt, max_tokens=1,
                                      logit_bias=bias)
