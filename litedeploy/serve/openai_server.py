"""OpenAI-compatible HTTP API over one AsyncEngine: the app, its guards, the server state.

Request handling lives in `handlers` (generation endpoints) and `streaming` (fan-out, SSE); the
ASGI guards (keys, body, overload, draining) in `guards`; debug endpoints in `debug`.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import time
from collections.abc import AsyncIterator
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware

from litedeploy import __version__
from litedeploy.config import GenerationConfig
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.request import RequestOutput
from litedeploy.engine.sampler import SampledToken
from litedeploy.serve import handlers
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import APIError, install_error_handlers
from litedeploy.serve.guards import (
    AUTH_EXEMPT_PATHS,
    BODY_READ_TIMEOUT_S,
    MAX_REQUEST_BYTES,
    Admission,
    AdmissionGuard,
    ApiKeyGuard,
    BodyLimitGuard,
    QueueTicket,
)
from litedeploy.serve.metrics import ServerMetrics
from litedeploy.serve.streaming import FanOut, SSEResponse

logger = logging.getLogger(__name__)

# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5
# Default cap on the tokens one request may ask to generate (n x max_tokens over its prompts).
MAX_REQUEST_NEW_TOKENS = 65536


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
    max_log_len: int | None = None
    disable_fastapi_docs: bool = False
    enable_debug_endpoints: bool = False


class OpenAIServer:
    """The state behind the routes: engine, settings, admission, metrics, token-text cache."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
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
        num_new = n * sum(gen.max_new_tokens or max(1, session_len - len(ids)) for ids in prompts)
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
        task = asyncio.ensure_future(handlers.collect_outputs(fan))
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
        text = self.token_text(token_id)
        return p.TopLogprob(token=text, logprob=logprob if logprob is not None else 0.0,
                            bytes=list(text.encode("utf-8")))

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


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:
    docs = not settings.disable_fastapi_docs
    app = FastAPI(title="litedeploy OpenAI-compatible API", version=__version__,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    server = OpenAIServer(engine, settings)
    app.state.server = server
    install_error_handlers(app)
    _add_routes(app, server)
    if settings.enable_debug_endpoints:
        from litedeploy.serve.debug import add_debug_routes

        add_debug_routes(app, server)
    # added innermost first: CORS outermost so that even error answers carry its headers
    app.add_middleware(AdmissionGuard, admission=server.admission)
    app.add_middleware(BodyLimitGuard, max_bytes=settings.max_request_bytes,
                       read_timeout_s=settings.body_read_timeout_s)
    if settings.api_keys:  # before the body guard: no key, no body read
        public = AUTH_EXEMPT_PATHS | ({"/metrics"} if settings.metrics_public else set())
        app.add_middleware(ApiKeyGuard, api_keys=settings.api_keys, public_paths=public)
    if settings.allow_origins:
        app.add_middleware(CORSMiddleware, allow_origins=settings.allow_origins,
                           allow_credentials=settings.allow_credentials,
                           allow_methods=settings.allow_methods,
                           allow_headers=settings.allow_headers)
    return app


# ---- routes -------------------------------------------------------------------------------------
def _add_routes(app: FastAPI, server: OpenAIServer) -> None:
    @app.get("/health")
    async def health() -> Response:
        # 503 while draining, so load balancers stop sending before the process exits
        return Response(status_code=503 if server.admission.draining else 200)

    @app.get("/metrics")
    async def metrics() -> Response:
        content, content_type = server.metrics.render()
        return Response(content, media_type=content_type)

    @app.get("/v1/models", response_model=p.ModelList)
    async def models() -> p.ModelList:
        engine = server.engine.engine
        card = p.ModelCard(id=server.settings.model_name, created=server.created,
                           root=server.settings.model_name, max_model_len=engine.session_len,
                           device=str(engine.device))
        return p.ModelList(data=[card])

    @app.post("/v1/encode", response_model=p.EncodeResponse, responses=p.ERROR_RESPONSES)
    async def encode(body: p.EncodeRequest) -> p.EncodeResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        # lmdeploy's add_bos: True keeps the tokenizer's own BOS rule, False drops the BOS
        ids = [server.engine.encode_prompt(text) if body.do_preprocess
               else server.engine.tokenizer.encode(text, add_bos=None if body.add_bos else False)
               for text in texts]
        if isinstance(body.input, str):
            return p.EncodeResponse(input_ids=ids[0], length=len(ids[0]))
        return p.EncodeResponse(input_ids=ids, length=[len(item) for item in ids])

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse,
              responses=p.ERROR_RESPONSES)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await handlers.chat_completions(server, body, request)

    @app.post("/v1/completions", response_model=p.CompletionResponse,
              responses=p.ERROR_RESPONSES)
    async def completions(body: p.CompletionRequest, request: Request):
        return await handlers.completions(server, body, request)
