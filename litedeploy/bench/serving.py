"""Load generator for a running OpenAI-compatible server: streaming requests at a Poisson rate,
at most `max_concurrency` in flight; throughput, TTFT/TPOT/ITL percentiles and errors as a dict.

TTFT is measured to the first chunk with text, TPOT as (latency - TTFT) / (output tokens - 1) per
request, ITL between text chunks. Output tokens come from the server's usage (stream_options).

Prompts are short chat-style texts, or with `input_len` exact-length prompts of random token ids
sent to /v1/completions (a long-context load that needs no client-side tokenizer).
"""

from __future__ import annotations

import asyncio
import itertools
import json
import math
import random
import time
from collections import Counter
from dataclasses import dataclass, field

TOPICS = ("cats", "the sea", "a lighthouse", "bread", "trains", "the moon", "a garden", "rain",
          "chess", "a library", "mountains", "coffee", "a violin", "winter", "bees", "a bridge")
NUM_ERROR_SAMPLES = 5
# --response-format json: every request asks for this schema. Its array needs more items than a
# run's max_tokens can hold, so constrained replies run to max_tokens like ignore_eos ones do and
# the two runs compare token rates over equal lengths.
BENCH_JSON_SCHEMA = {
    "type": "object",
    "properties": {
        "title": {"type": "string"},
        "facts": {"type": "array", "minItems": 1024, "items": {
            "type": "object",
            "properties": {"topic": {"type": "string"}, "detail": {"type": "string"},
                           "score": {"type": "integer"}},
            "required": ["topic", "detail", "score"]}},
    },
    "required": ["title", "facts"],
}
# --tools: every chat request offers this tool and requires a call (a grammar-forced
# `tool_choice: "required"`); its arguments are the schema above, so calls run to max_tokens too.
BENCH_TOOL = {"type": "function", "function": {
    "name": "record_facts", "description": "Record facts about the topic",
    "parameters": BENCH_JSON_SCHEMA}}
RESPONSE_FORMATS = ("text", "json", "tools")


@dataclass
class RequestResult:
    ok: bool = False
    status: int | None = None
    error: str | None = None
    ttft_s: float | None = None
    latency_s: float = 0.0
    num_output_tokens: int = 0
    num_prompt_tokens: int = 0
    inter_token_s: list[float] = field(default_factory=list)


def make_prompts(num_prompts: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [f"Tell me about {rng.choice(TOPICS)} in {rng.randint(2, 6)} sentences. (#{i})"
            for i in range(num_prompts)]


def make_token_prompts(num_prompts: int, input_len: int, vocab_size: int,
                       seed: int) -> list[list[int]]:
    """Random token ids, away from the low ids where tokenizers keep their special tokens."""
    rng = random.Random(seed)
    first_id = min(1000, vocab_size // 4)
    return [[rng.randrange(first_id, vocab_size) for _ in range(input_len)]
            for _ in range(num_prompts)]


def _payload(endpoint: str, model: str, prompt: str | list[int], max_tokens: int,
             ignore_eos: bool, response_format: str = "text") -> dict:
    body = {"model": model, "max_tokens": max_tokens, "stream": True, "temperature": 0.0,
            "ignore_eos": ignore_eos, "stream_options": {"include_usage": True}}
    if response_format == "json":
        body["response_format"] = {"type": "json_schema", "json_schema": {
            "name": "facts", "schema": BENCH_JSON_SCHEMA}}
    elif response_format == "tools":
        body.update(tools=[BENCH_TOOL], tool_choice="required")
    if endpoint == "chat":
        return {**body, "messages": [{"role": "user", "content": prompt}]}
    return {**body, "prompt": prompt}


def _chunk_text(chunk: dict) -> str:
    texts = []
    for choice in chunk.get("choices") or ():
        delta = choice.get("delta") or {}
        texts.append(delta.get("content") or choice.get("text") or "")
        # --tools: the reply streams as argument pieces of tool calls
        texts += [(call.get("function") or {}).get("arguments") or ""
                  for call in delta.get("tool_calls") or ()]
    return "".join(texts)


async def _one_request(client, url: str, payload: dict) -> RequestResult:
    result = RequestResult()
    start = last = time.perf_counter()
    try:
        async with client.stream("POST", url, json=payload) as response:
            result.status = response.status_code
            if response.status_code != 200:
                body = (await response.aread()).decode(errors="replace")
                result.error = _error_message(body)
                return result
            async for line in response.aiter_lines():
                if not line.startswith("data: ") or line == "data: [DONE]":
                    continue
                chunk = json.loads(line[len("data: "):])
                if "error" in chunk:
                    result.error = chunk["error"].get("message", "error event in the stream")
                    return result
                now = time.perf_counter()
                if _chunk_text(chunk):
                    if result.ttft_s is None:
                        result.ttft_s = now - start
                    else:
                        result.inter_token_s.append(now - last)
                    last = now
                usage = chunk.get("usage")
                if usage:
                    result.num_output_tokens = usage["completion_tokens"]
                    result.num_prompt_tokens = usage["prompt_tokens"]
        result.ok = True
    except Exception as exc:  # noqa: BLE001 - a failed request is a figure, not a crash
        result.error = f"{type(exc).__name__}: {exc}"
    finally:
        result.latency_s = time.perf_counter() - start
    return result


def _error_message(body: str) -> str:
    try:
        return json.loads(body)["error"]["message"]
    except (ValueError, KeyError, TypeError):
        return body[:200]


def percentiles_ms(values_s: list[float]) -> dict[str, float] | None:
    if not values_s:
        return None
    ordered = sorted(values_s)

    def pick(q: float) -> float:
        return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]

    return {"mean": round(1000 * sum(ordered) / len(ordered), 2),
            **{f"p{int(q * 100)}": round(1000 * pick(q), 2) for q in (0.5, 0.9, 0.99)},
            "max": round(1000 * ordered[-1], 2)}


async def _discover_model(client, base_url: str) -> str:
    response = await client.get(base_url + "/v1/models")
    response.raise_for_status()
    return response.json()["data"][0]["id"]


async def run_serving_async(url: str, num_prompts: int, request_rate: float = math.inf,
                            max_concurrency: int | None = None, *, max_tokens: int = 64,
                            endpoint: str = "chat", model: str | None = None,
                            api_key: str | None = None, seed: int = 0, ignore_eos: bool = True,
                            timeout_s: float = 600.0, verify: bool | str = True,
                            input_len: int | None = None, vocab_size: int = 32000,
                            response_format: str = "text") -> dict:
    """`input_len`: prompts of that many random token ids below `vocab_size` (completions only).
    `response_format` "json": every request carries a json_schema (structured output)."""
    import httpx

    if input_len is not None and endpoint != "completions":
        raise ValueError("token-id prompts (input_len) go to the completions endpoint only")
    if response_format not in RESPONSE_FORMATS:
        raise ValueError(f"response_format must be one of {RESPONSE_FORMATS}")
    if response_format == "tools" and endpoint != "chat":
        raise ValueError("tool calls (--tools) are a chat endpoint feature")

    # comma-separated URLs: requests go round-robin (replicas without a router in front)
    base_urls = [item.strip().rstrip("/").removesuffix("/v1") for item in url.split(",")]
    base_url = ",".join(base_urls)
    path = "/v1/chat/completions" if endpoint == "chat" else "/v1/completions"
    headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
    limit = max_concurrency or num_prompts
    limits = httpx.Limits(max_connections=limit, max_keepalive_connections=limit)
    rng = random.Random(seed)
    semaphore = asyncio.Semaphore(limit)
    in_flight = peak = 0

    async with httpx.AsyncClient(headers=headers, timeout=timeout_s, limits=limits,
                                 verify=verify) as client:
        model = model or await _discover_model(client, base_urls[0])
        next_url = itertools.cycle(base_urls)

        async def limited(prompt: str | list[int]) -> RequestResult:
            nonlocal in_flight, peak
            target = next(next_url) + path
            async with semaphore:
                in_flight += 1
                peak = max(peak, in_flight)
                try:
                    return await _one_request(client, target, _payload(
                        endpoint, model, prompt, max_tokens, ignore_eos, response_format))
                finally:
                    in_flight -= 1

        start = time.perf_counter()
        tasks = []
        prompts = (make_prompts(num_prompts, seed) if input_len is None
                   else make_token_prompts(num_prompts, input_len, vocab_size, seed))
        for prompt in prompts:
            tasks.append(asyncio.create_task(limited(prompt)))
            if math.isfinite(request_rate):
                await asyncio.sleep(rng.expovariate(request_rate))
        results = await asyncio.gather(*tasks)
        duration_s = time.perf_counter() - start
    return summarize(results, duration_s, peak, url=base_url, endpoint=endpoint, model=model,
                     num_prompts=num_prompts, request_rate=request_rate,
                     max_concurrency=max_concurrency, max_tokens=max_tokens, input_len=input_len,
                     response_format=response_format)


def summarize(results: list[RequestResult], duration_s: float, peak_concurrency: int,
              **setup) -> dict:
    done = [r for r in results if r.ok]
    failed = [r for r in results if not r.ok]
    num_output = sum(r.num_output_tokens for r in done)
    tpots = [(r.latency_s - r.ttft_s) / (r.num_output_tokens - 1) for r in done
             if r.ttft_s is not None and r.num_output_tokens > 1]
    rate = setup.get("request_rate")
    setup["request_rate"] = "inf" if rate is not None and math.isinf(rate) else rate
    return {
        **setup,
        "completed": len(done), "errors": len(failed),
        "errors_by_status": dict(Counter(str(r.status) for r in failed)),
        "error_samples": [{"status": r.status, "error": r.error}
                          for r in failed[:NUM_ERROR_SAMPLES]],
        "duration_s": round(duration_s, 3), "peak_concurrency": peak_concurrency,
        "total_prompt_tokens": sum(r.num_prompt_tokens for r in done),
        "total_output_tokens": num_output,
        "request_throughput_per_s": round(len(done) / duration_s, 3) if duration_s else None,
        "output_throughput_tok_per_s": round(num_output / duration_s, 2) if duration_s else None,
        "ttft_ms": percentiles_ms([r.ttft_s for r in done if r.ttft_s is not None]),
        "tpot_ms": percentiles_ms(tpots),
        # every request's values, for the distributions of `bench serving --plot`
        "ttft_ms_all": [round(1000 * r.ttft_s, 2) for r in done if r.ttft_s is not None],
        "tpot_ms_all": [round(1000 * value, 3) for value in tpots],
        "itl_ms": percentiles_ms([s for r in done for s in r.inter_token_s]),
        "e2e_latency_ms": percentiles_ms([r.latency_s for r in done]),
    }


def run_serving(url: str, num_prompts: int, request_rate: float = math.inf,
                max_concurrency: int | None = None, **options) -> dict:
    """Blocking wrapper of `run_serving_async` (options: max_tokens, endpoint, model, api_key,
    seed, ignore_eos, timeout_s, verify, input_len, vocab_size, response_format)."""
    return asyncio.run(run_serving_async(url, num_prompts, request_rate, max_concurrency,
                                         **options))
