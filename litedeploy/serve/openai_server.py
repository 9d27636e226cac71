"""OpenAI-compatible HTTP API over one AsyncEngine: FastAPI routes, fan-out of `n`, SSE streams.

A streamed response holds its engine streams open; when the client goes away the response task is
cancelled and `SSEResponse` closes every stream, aborting the requests and freeing their KV blocks.
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import aclosing
from dataclasses import dataclass, field

from fastapi import FastAPI, Request, Response
from fastapi.middleware.cors import CORSMiddleware
from starlette.responses import StreamingResponse

from litedeploy import __version__
from litedeploy.config import GenerationConfig
from litedeploy.engine.async_engine import AsyncEngine
from litedeploy.engine.request import RequestOutput
from litedeploy.engine.sampler import SampledToken
from litedeploy.errors import RequestError
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import (
    APIError,
    ApiKeyGuard,
    BodyLimitGuard,
    ConcurrencyGuard,
    error_body,
    install_error_handlers,
)
from litedeploy.serve.metrics import ServerMetrics

logger = logging.getLogger(__name__)

# How often a non-streamed request checks that its client is still there.
DISCONNECT_POLL_S = 0.5


@dataclass
class ServerSettings:
    model_name: str
    api_keys: list[str] | None = None
    allow_origins: list[str] = field(default_factory=lambda: ["*"])
    allow_credentials: bool = False
    allow_methods: list[str] = field(default_factory=lambda: ["*"])
    allow_headers: list[str] = field(default_factory=lambda: ["*"])
    max_concurrent_requests: int | None = None
    max_log_len: int | None = None
    disable_fastapi_docs: bool = False


class FanOut:
    """Runs several engine streams at once and yields `(choice_index, output)` as they arrive.

    `start()` waits until every stream has its first output, so a request the engine rejects
    (RequestError) fails before any byte of the response is sent.
    """

    def __init__(self, streams: list[AsyncIterator[RequestOutput]]):
        self.streams = streams
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.primed: list[tuple[int, RequestOutput]] = []

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await self.queue.put((index, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who reports it
            await self.queue.put((index, exc))

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]
        waiting = set(range(len(self.streams)))
        while waiting:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            waiting.discard(index)
            self.primed.append((index, item))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        num_open = len(self.streams)
        items, self.primed = self.primed, []
        while num_open:
            for index, item in items:
                if isinstance(item, Exception):
                    raise item
                num_open -= item.finished
                yield index, item
            items = [await self.queue.get()] if num_open else []

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()


class SSEResponse(StreamingResponse):
    """Streams until done or the client disconnects; always closes the engine streams."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            finally:
                watcher.cancel()

        async def watch_disconnect() -> None:
            await self.listen_for_disconnect(receive)
            streamer.cancel()  # the client left: stop generating now, not at the next send

        streamer = asyncio.create_task(stream())
        watcher = asyncio.create_task(watch_disconnect())
        try:
            await asyncio.gather(streamer, watcher, return_exceptions=True)
        finally:
            streamer.cancel()
            watcher.cancel()
            await self.body_iterator.aclose()
            await self.on_close()


def _sse(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


class OpenAIServer:
    """The state behind the routes: engine, settings, metrics, token-text cache."""

    def __init__(self, engine: AsyncEngine, settings: ServerSettings):
        self.engine = engine
        self.settings = settings
        self.created = int(time.time())
        self.metrics = ServerMetrics(engine.stats, settings.model_name)
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

    def fan_out(self, prompts: list[list[int]], gen: GenerationConfig, n: int,
                request_id: str) -> FanOut:
        """n choices per prompt; choice `k * n + j` uses seed + j so the choices differ."""
        try:
            gen.validate()
        except ValueError as exc:
            raise APIError(400, str(exc)) from exc
        streams = []
        for k, prompt_ids in enumerate(prompts):
            for j in range(n):
                seed = None if gen.random_seed is None else gen.random_seed + j
                choice_gen = dataclasses.replace(gen, random_seed=seed)
                streams.append(self._tracked(prompt_ids, choice_gen, f"{request_id}-{k * n + j}"))
        return FanOut(streams)

    async def _tracked(self, prompt_ids: list[int], gen: GenerationConfig,
                       request_id: str) -> AsyncIterator[RequestOutput]:
        timer = self.metrics.timer()
        stream = self.engine.generate(None, gen, input_ids=prompt_ids, request_id=request_id)
        async with aclosing(stream):
            async for out in stream:
                timer.on_output(len(out.token_ids), out.finished, out.finish_reason,
                                out.input_token_len, out.generate_token_len)
                if out.error:
                    raise APIError(500, f"generation failed: {out.error}")
                yield out

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
        task = asyncio.ensure_future(_collect(fan))
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


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage_of(finals: dict[int, RequestOutput], n: int) -> p.Usage:
    """Prompt tokens counted once per prompt (not per choice), completion tokens per choice."""
    prompt_outputs = [out for index, out in finals.items() if index % n == 0]
    prompt_tokens = sum(out.input_token_len for out in prompt_outputs)
    completion_tokens = sum(out.generate_token_len for out in finals.values())
    cached = sum(out.num_cached_tokens for out in prompt_outputs)
    return p.Usage(prompt_tokens=prompt_tokens, completion_tokens=completion_tokens,
                   total_tokens=prompt_tokens + completion_tokens,
                   prompt_tokens_details=p.PromptTokensDetails(cached_tokens=cached))


def stream_error_event(exc: Exception) -> str:
    status = exc.status if isinstance(exc, APIError) else 400 if isinstance(
        exc, RequestError) else 500
    if status == 500 and not isinstance(exc, APIError):
        logger.exception("stream failed", exc_info=exc)
    return _sse(error_body(status, str(exc)))


def create_app(engine: AsyncEngine, settings: ServerSettings) -> FastAPI:

    docs = not settings.disable_fastapi_docs
    app = FastAPI(title="litedeploy OpenAI-compatible API", version=__version__,
                  docs_url="/docs" if docs else None, redoc_url="/redoc" if docs else None,
                  openapi_url="/openapi.json" if docs else None)
    server = OpenAIServer(engine, settings)
    app.state.server = server
    install_error_handlers(app)
    _add_routes(app, server)
    # added innermost first: CORS outermost so that even error answers carry its headers
    if settings.max_concurrent_requests:
        app.add_middleware(ConcurrencyGuard, max_requests=settings.max_concurrent_requests)
    if settings.api_keys:
        app.add_middleware(ApiKeyGuard, api_keys=settings.api_keys)
    app.add_middleware(BodyLimitGuard)
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
        return Response(status_code=200)

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

    @app.post("/v1/encode", response_model=p.EncodeResponse)
    async def encode(body: p.EncodeRequest) -> p.EncodeResponse:
        texts = [body.input] if isinstance(body.input, str) else body.input
        # lmdeploy's add_bos: True keeps the tokenizer's own BOS rule, False drops the BOS
        ids = [server.engine.encode_prompt(text) if body.do_preprocess
               else server.engine.tokenizer.encode(text, add_bos=None if body.add_bos else False)
               for text in texts]
        if isinstance(body.input, str):
            return p.EncodeResponse(input_ids=ids[0], length=len(ids[0]))
        return p.EncodeResponse(input_ids=ids, length=[len(item) for item in ids])

    @app.post("/v1/chat/completions", response_model=p.ChatCompletionResponse)
    async def chat_completions(body: p.ChatCompletionRequest, request: Request):
        return await _chat_completions(server, body, request)

    @app.post("/v1/completions", response_model=p.CompletionResponse)
    async def completions(body: p.CompletionRequest, request: Request):
        return await _completions(server, body, request)


def _encode_messages(server: OpenAIServer, messages: list[dict]) -> list[int]:
    from jinja2 import TemplateError

    try:
        return server.engine.encode_prompt(messages)
    except (TemplateError, TypeError, KeyError) as exc:
        raise APIError(400, f"the chat template cannot render these messages: {exc}",
                       param="messages") from exc


async def _collect(fan: FanOut):
    texts: dict[int, str] = {}
    logprobs: dict[int, list[SampledToken]] = {}
    finals: dict[int, RequestOutput] = {}
    async for index, out in fan:
        texts[index] = texts.get(index, "") + out.text
        if out.logprobs is not None:
            logprobs.setdefault(index, []).extend(out.logprobs)
        if out.finished:
            finals[index] = out
    return texts, logprobs, finals


async def _chat_completions(server: OpenAIServer, body: p.ChatCompletionRequest,
                           request: Request):
    server.check_model(body.model)
    messages = [message.for_template() for message in body.messages]
    prompt_ids = _encode_messages(server, messages)
    gen = body.to_generation_config()
    request_id = new_id("chatcmpl")
    server.log_request(request_id, messages, gen, body.user)
    fan = server.fan_out([prompt_ids], gen, body.n, request_id)
    await server.start(fan)
    created = int(time.time())
    if body.stream:
        return server.respond_stream(fan, _chat_events(server, fan, body, request_id, created))
    texts, logprobs, finals = await server.collect(fan, request)
    empty = [] if body.logprobs else None
    choices = [p.ChatChoice(index=i, message=p.AssistantMessage(content=texts.get(i, "")),
                            logprobs=server.chat_logprobs(logprobs.get(i, empty)),
                            finish_reason=finals[i].finish_reason) for i in sorted(finals)]
    return p.ChatCompletionResponse(id=request_id, created=created, model=body.model,
                                    choices=choices, usage=usage_of(finals, body.n))


async def _chat_events(server: OpenAIServer, fan: FanOut, body: p.ChatCompletionRequest,
                       request_id: str, created: int) -> AsyncIterator[str]:
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": body.model}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return _sse({**base, "choices": choices, **({"usage": usage} if body.include_usage
                                                   else {})})

    def choice(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}

    yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in fan:
            if out.text or out.logprobs:
                logprobs = server.chat_logprobs(out.logprobs)
                yield chunk([choice(index, {"content": out.text},
                                    logprobs.model_dump() if logprobs else None)])
            if out.finished:
                finals[index] = out
                yield chunk([choice(index, {}, None, out.finish_reason)])
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield stream_error_event(exc)
    else:
        if body.include_usage:
            yield chunk([], usage_of(finals, body.n).model_dump())
    yield "data: [DONE]\n\n"


async def _completions(server: OpenAIServer, body: p.CompletionRequest,
                      request: Request):
    server.check_model(body.model)
    prompts: list[str | list[int]] = body.prompt
    prompt_ids = [server.engine.encode_prompt(x, do_preprocess=False) if isinstance(x, str)
                  else x for x in prompts]
    echoes = [(x if isinstance(x, str) else server.engine.tokenizer.decode(x, False))
              if body.echo else "" for x in prompts]
    gen = body.to_generation_config()
    request_id = new_id("cmpl")
    server.log_request(request_id, prompts, gen, body.user)
    fan = server.fan_out(prompt_ids, gen, body.n, request_id)
    await server.start(fan)
    created = int(time.time())
    if body.stream:
        events = _completion_events(server, fan, body, echoes, request_id, created)
        return server.respond_stream(fan, events)
    texts, logprobs, finals = await server.collect(fan, request)
    empty = [] if body.logprobs is not None else None
    choices = [p.CompletionChoice(index=i, text=echoes[i // body.n] + texts.get(i, ""),
                                  logprobs=server.completion_logprobs(logprobs.get(i, empty), 0),
                                  finish_reason=finals[i].finish_reason) for i in sorted(finals)]
    return p.CompletionResponse(id=request_id, created=created, model=body.model,
                                choices=choices, usage=usage_of(finals, body.n))


async def _completion_events(server: OpenAIServer, fan: FanOut, body: p.CompletionRequest,
                             echoes: list[str], request_id: str,
                             created: int) -> AsyncIterator[str]:
    base = {"id": request_id, "object": "text_completion", "created": created,
            "model": body.model}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return _sse({**base, "choices": choices, **({"usage": usage} if body.include_usage
                                                   else {})})

    num_choices = len(echoes) * body.n
    if body.echo:
        yield chunk([{"index": i, "text": echoes[i // body.n], "logprobs": None,
                      "finish_reason": None} for i in range(num_choices)])
    offsets = [0] * num_choices
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in fan:
            if not (out.text or out.logprobs or out.finished):
                continue
            logprobs = server.completion_logprobs(out.logprobs, offsets[index])
            offsets[index] += len(out.text)
            finals.update({index: out} if out.finished else {})
            yield chunk([{"index": index, "text": out.text,
                          "logprobs": logprobs.model_dump() if logprobs else None,
                          "finish_reason": out.finish_reason if out.finished else None}])
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield stream_error_event(exc)
    else:
        if body.include_usage:
            yield chunk([], usage_of(finals, body.n).model_dump())
    yield "data: [DONE]\n\n"
