"""The two generation endpoints: /v1/chat/completions and /v1/completions, full or streamed."""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import AsyncIterator
from typing import TYPE_CHECKING

from fastapi import Request

from litedeploy.engine.request import RequestOutput
from litedeploy.errors import RequestError
from litedeploy.serve import protocol as p
from litedeploy.serve.errors import APIError, error_body
from litedeploy.serve.logprobs_format import CompletionStream, completion_choice
from litedeploy.serve.streaming import FanOut, sse_event
from litedeploy.serve.tool_chat import ChatTools

if TYPE_CHECKING:
    from litedeploy.serve.state import OpenAIServer

logger = logging.getLogger(__name__)


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
    return sse_event(error_body(status, str(exc)))



def _encode_messages(server: OpenAIServer, messages: list[dict]) -> list[int]:
    from jinja2 import TemplateError

    try:
        return server.prompts.encode(messages)
    except (TemplateError, TypeError, KeyError) as exc:
        raise APIError(400, f"the chat template cannot render these messages: {exc}",
                       param="messages") from exc


async def chat_completions(server: OpenAIServer, body: p.ChatCompletionRequest,
                           request: Request):
    server.check_model(body.model)
    messages = [message.for_template() for message in body.messages]
    tools = ChatTools.for_request(server, body)  # None without tools (or tool messages)
    prompt_ids = tools.encode(server, messages) if tools else _encode_messages(server, messages)
    gen = body.to_generation_config()
    if tools:
        tools.adjust(gen)
    request_id = new_id("chatcmpl")
    server.log_request(request_id, messages, gen, body.user)
    fan = server.fan_out([prompt_ids], gen, body.n, request_id)
    await server.start(fan)
    created = int(time.time())
    if body.stream:
        return server.respond_stream(
            fan, _chat_events(server, fan, body, request_id, created, tools))
    texts, logprobs, finals = await server.collect(fan, request)
    empty = [] if body.logprobs else None
    choices = [p.ChatChoice(index=i, message=_assistant_message(tools, i, texts.get(i, "")),
                            logprobs=server.chat_logprobs(logprobs.get(i, empty)),
                            finish_reason=_finish_reason(tools, i, finals[i].finish_reason))
               for i in sorted(finals)]
    return p.ChatCompletionResponse(id=request_id, created=created, model=body.model,
                                    choices=choices, usage=usage_of(finals, body.n))


def _assistant_message(tools: ChatTools | None, index: int, text: str) -> p.AssistantMessage:
    if tools is None:
        return p.AssistantMessage(content=text)
    content, tool_calls = tools.message(index, text)
    return p.AssistantMessage(content=content, tool_calls=tool_calls)


def _finish_reason(tools: ChatTools | None, index: int, reason: str | None) -> str | None:
    return reason if tools is None else tools.finish_reason(index, reason)


async def _chat_events(server: OpenAIServer, fan: FanOut, body: p.ChatCompletionRequest,
                       request_id: str, created: int,
                       tools: ChatTools | None = None) -> AsyncIterator[str]:
    base = {"id": request_id, "object": "chat.completion.chunk", "created": created,
            "model": body.model}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return sse_event({**base, "choices": choices, **({"usage": usage} if body.include_usage
                                                   else {})})

    def choice(index: int, delta: dict, logprobs=None, finish_reason=None) -> dict:
        return {"index": index, "delta": delta, "logprobs": logprobs,
                "finish_reason": finish_reason}

    yield chunk([choice(i, {"role": "assistant", "content": ""}) for i in range(body.n)])
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in fan:
            if tools is None:
                delta = {"content": out.text} if out.text else None
            else:  # content and tool-call fragments (None while the parser holds text back)
                delta = tools.stream_delta(index, out.text, out.finished)
            if delta or out.logprobs:
                logprobs = server.chat_logprobs(out.logprobs)
                yield chunk([choice(index, delta or {},
                                    logprobs.model_dump() if logprobs else None)])
            if out.finished:
                finals[index] = out
                reason = _finish_reason(tools, index, out.finish_reason)
                yield chunk([choice(index, {}, None, reason)])
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield stream_error_event(exc)
    else:
        if body.include_usage:
            yield chunk([], usage_of(finals, body.n).model_dump())
    yield "data: [DONE]\n\n"


async def completions(server: OpenAIServer, body: p.CompletionRequest,
                      request: Request):
    server.check_model(body.model)
    prompts: list[str | list[int]] = body.prompt
    prompt_ids = [server.prompts.encode(x, do_preprocess=False) if isinstance(x, str)
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
        stream = CompletionStream(server.engine.tokenizer, body, prompt_ids, echoes)
        events = _completion_events(stream, fan, body, echoes, request_id, created)
        return server.respond_stream(fan, events)
    texts, logprobs, finals = await server.collect(fan, request)
    tokenizer = server.engine.tokenizer
    choices = [completion_choice(tokenizer, body, i, prompt_ids[i // body.n], echoes[i // body.n],
                                 texts.get(i, ""), logprobs.get(i), finals[i])
               for i in sorted(finals)]
    return p.CompletionResponse(id=request_id, created=created, model=body.model,
                                choices=choices, usage=usage_of(finals, body.n))


async def _completion_events(stream: CompletionStream, fan: FanOut, body: p.CompletionRequest,
                             echoes: list[str], request_id: str,
                             created: int) -> AsyncIterator[str]:
    base = {"id": request_id, "object": "text_completion", "created": created,
            "model": body.model}

    def chunk(choices: list[dict], usage: dict | None = None) -> str:
        return sse_event({**base, "choices": choices, **({"usage": usage} if body.include_usage
                                                   else {})})

    num_choices = len(echoes) * body.n
    if body.echo:
        yield chunk([{"index": i, "text": echoes[i // body.n], "logprobs": None,
                      "finish_reason": None} for i in range(num_choices)])
    finals: dict[int, RequestOutput] = {}
    try:
        async for index, out in fan:
            if not (out.text or out.logprobs or out.finished or out.prompt_logprobs):
                continue
            finals.update({index: out} if out.finished else {})
            yield chunk([stream.choice(index, out)])
    except Exception as exc:  # noqa: BLE001 - the status line is sent: report in the stream
        yield stream_error_event(exc)
    else:
        if body.include_usage:
            yield chunk([], usage_of(finals, body.n).model_dump())
    yield "data: [DONE]\n\n"
