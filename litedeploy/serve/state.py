"""The state behind the OpenAI-compatible routes: settings, engine, prompt encoder, admission,
metrics, token-text cache. Its own module so that `openai_server` (the app), `handlers` and `debug`
all import it and none imports another's importer.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import Request

from litedeploy.chat.prompt import PromptEncoder
from litedeploy.config import GenerationConfig
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.request import RequestOutput
from litedeploy.engine.sampler import SampledToken
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import APIError
from litedeploy.serve.guards import (
    BODY_READ_TIMEOUT_S,
    BODY_TIMEOUT_S,
    MAX_REQUEST_BYTES,
    Admission,
    QueueTicket,
)
from litedeploy.serve.logprobs_format import token_texts
from litedeploy.serve.metrics import ServerMetrics
from litedeploy.serve.streaming import FanOut, SSEResponse, collect_outputs

logger = logging.getLogger(__name__)

# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
# Default cap on the tokens one request may ask to generate (n x max_tokens over its prompts).
MAX_REQUEST_NEW_TOKENS = 65536
# Prompt characters in the INFO request log: enough to recognise a request, not a whole document.
MAX_LOG_LEN = 256


@dataclass
class ServerSettings:
    model_name: str
    api_keys: list[str] | None = None
    metrics_public: bool = False  # /metrics without a key even with api_keys
    allow_origins: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    allow_methods: list[str] = field(default_factory=lambda: ["*"])
    allow_headers: list[str] = field(default_factory=lambda: ["*"])
    max_concurrent_requests: int | None = None
    max_waiting_requests: int | None = None
    max_request_new_tokens: int = MAX_REQUEST_NEW_TOKENS
    max_request_bytes: int = MAX_REQUEST_BYTES
    body_read_timeout_s: float = BODY_READ_TIMEOUT_S
    body_timeout_s: float = BODY_TIMEOUT_S
    max_log_len: int | None = MAX_LOG_LEN  # None: whole prompts
    disable_fastapi_docs: bool = False
    enable_debug_endpoints: bool = False
    tool_call_parser: str | None = None  # None: the model type's format (serve/tools)


class OpenAIServer:
    """The state behind the routes: engine, prompts, settings, admission, metrics, token-text
    cache."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.prompts = PromptEncoder.for_engine(engine)  # chat template + raw text -> token ids
        self.settings = settings
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.stats, settings.model_name)
        self.admission = Admission(settings.max_concurrent_requests,
                                   settings.max_waiting_requests)
        self._token_texts: dict[int, str] = {}

    # ---- helpers ---------------------------------------------------------------------------
    def check_model(self, model: str) -> None:
        if model != self.settings.model_name:
            raise APIError(404, f"the model {model!r} does not exist; this server serves "
                                f"{self.settings.model_name!r} (see GET /v1/models)",
                           param="model", code="model_not_found")

    def log_request(self, request_id: str, prompt: object, gen: GenerationConfig,
                    user: str | None) -> None:
        if not logger.isEnabledFor(logging.INFO):
            return
        text = str(prompt)
        limit = self.settings.max_log_len
        if limit is not None and len(text) > limit:
            text = text[:limit] + f"...({len(text) - limit} more chars)"
        logger.info("%s user=%s prompt=%r gen=%s", request_id, user, text, gen)

    def check_request_size(self, prompts: list[list[int]], gen: GenerationConfig, n: int) -> None:
        """400 for a request that asks for too many choices or tokens in all (--max-request-new-
        tokens), so one request cannot occupy the whole engine."""
        num_choices = len(prompts) * n
        if num_choices > p.MAX_N:
            raise APIError(400, f"{len(prompts)} prompts x n={n} = {num_choices} choices; at "
                                f"most {p.MAX_N} per request", param="n")
        session_len = self.engine.engine.session_len
        max_new = gen.max_new_tokens  # 0: prompt logprobs only, nothing generated
        num_new = n * sum(max(1, session_len - len(ids)) if max_new is None else max_new
                          for ids in prompts)
        limit = self.settings.max_request_new_tokens
        if num_new > limit:
            raise APIError(400, f"this request may generate {num_new} tokens (n={n} x max_tokens "
                                f"{gen.max_new_tokens or 'up to the session length'} over "
                                f"{len(prompts)} prompt(s)); the limit is {limit} "
                                "(--max-request-new-tokens): lower n or max_tokens",
                           param="max_tokens")

    def fan_out(self, prompts: list[list[int]], gen: GenerationConfig, n: int,
                request_id: str) -> FanOut:
        """n choices per prompt; choice `k * n + j` uses seed + j so the choices differ."""
        try:
            gen.validate()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        self.check_request_size(prompts, gen, n)
        self.admission.check_queue()
        streams, tickets = [], []
        for k, prompt_ids in enumerate(prompts):
            for j in range(n):
                seed = None if gen.random_seed is None else gen.random_seed + j
                choice_gen = dataclasses.replace(gen, random_seed=seed)
                tickets.append(QueueTicket(self.admission))
                streams.append(self._tracked(prompt_ids, choice_gen,
                                             f"{request_id}-{k * n + j}", tickets[-1]))
        return FanOut(streams, tickets)

    async def _tracked(self, prompt_ids: list[int], gen: GenerationConfig, request_id: str,
                       ticket: QueueTicket) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.timer()
        stream = self.engine.generate(None, gen, input_ids=prompt_ids, request_id=request_id)
        try:
            async with aclosing(stream):
                async for out in stream:
                    ticket.release()  # it left the queue: the engine works on it
                    timer.on_output(len(out.token_ids), out.finished, out.finish_reason,
                                    out.input_token_len, out.generate_token_len)
                    if out.error:
                        raise APIError(500, f"generation failed: {out.error}")
                    yield out
        finally:
            ticket.release()

    async def start(self, fan: FanOut) -> None:
        try:
            await fan.start()
        except BaseException:
            await fan.aclose()
            raise

    def respond_stream(self, fan: FanOut, events: AsyncIterator[str]) -> SSEResponse:
        return SSEResponse(events, on_close=fan.aclose)

    async def collect(self, fan: FanOut, request: Request):
        """Runs a non-streamed fan-out to the end; a client that hangs up aborts it."""
        task = asyncio.ensure_future(collect_outputs(fan))
        try:
            while not task.done():
                await asyncio.wait({task}, timeout=DISCONNECT_POLL_S)
                if not task.done() and await request.is_disconnected():
                    raise APIError(499, "the client closed the connection")
            return task.result()
        finally:
            task.cancel()
            await fan.aclose()

    def token_text(self, token_id: int) -> str:
        text = self._token_texts.get(token_id)
        if text is None:
            text = self.engine.tokenizer.decode([token_id], skip_special_tokens=False)
            self._token_texts[token_id] = text
        return text

    def _top(self, token_id: int, logprob: float | None) -> p.TopLogprob:
        texts = token_texts(self.engine.tokenizer)  # bytes-faithful, as in /v1/completions
        return p.TopLogprob(token=texts.text(token_id),
                            logprob=logprob if logprob is not None else 0.0,
                            bytes=list(texts.raw(token_id)))

    def chat_logprobs(self, sampled: list[SampledToken] | None) -> p.ChatLogprobs | None:
        if sampled is None:
            return None
        content = []
        for token in sampled:
            top = self._top(token.token_id, token.logprob)
            alternatives = [self._top(i, lp) for i, lp in token.top_logprobs or ()]
            content.append(p.TokenLogprob(**top.model_dump(), top_logprobs=alternatives))
        return p.ChatLogprobs(content=content)

    def completion_logprobs(self, sampled: list[SampledToken] | None,
                            text_offset: int) -> p.CompletionLogprobs | None:
        if sampled is None:
            return None
        result = p.CompletionLogprobs(tokens=[], token_logprobs=[], top_logprobs=[],
                                      text_offset=[])
        for token in sampled:
            text = self.token_text(token.token_id)
            result.tokens.append(text)
            result.token_logprobs.append(token.logprob if token.logprob is not None else 0.0)
            result.top_logprobs.append(
                {self.token_text(i): lp for i, lp in token.top_logprobs or ()})
            result.text_offset.append(text_offset)
            text_offset += len(text)
        return result
