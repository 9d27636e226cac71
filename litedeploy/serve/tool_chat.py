"""Tool calling in /v1/chat/completions: what the chat handler does differently for a request
with `tools` (or with tool calls and results in its messages).

The prompt: the tools and past calls through the model's chat template (serve/tools/plan.py).
The generation: a grammar for `required` / a named function; special tokens kept where the
format's markers are special tokens. The reply: each choice's text through a fresh incremental
parser, into `message.tool_calls` or streamed `delta.tool_calls`.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from litedeploy.config import GenerationConfig
from litedeploy.serve.errors import APIError
from litedeploy.serve.tools import ToolCallParser, resolve_parser
from litedeploy.serve.tools.base import ParsedDelta, ToolCallDelta, assemble
from litedeploy.serve.tools.plan import ToolPlan, encode_with_tools, finish_reason

if TYPE_CHECKING:
    from litedeploy.serve import protocol as p


def model_type_of(server) -> str | None:
    return server.engine.engine.bundle.source.hf_config.get("model_type")


def parser_for(server) -> type[ToolCallParser] | None:
    """--tool-call-parser, else the model type's format (validated when the server starts)."""
    return resolve_parser(server.settings.tool_call_parser, model_type_of(server))


@dataclass
class ChatTools:
    plan: ToolPlan | None  # None: no tools offered, but the messages hold calls or results
    parser_cls: type[ToolCallParser] | None
    parsers: dict[int, ToolCallParser | None] = field(default_factory=dict)
    called: set[int] = field(default_factory=set)  # choices that made a call

    @classmethod
    def for_request(cls, server, body: p.ChatCompletionRequest) -> ChatTools | None:
        """None for a request without anything about tools (the plain chat path)."""
        has_tool_messages = any(m.tool_calls or m.role == "tool" for m in body.messages)
        if not (body.tools or body.tool_choice is not None or has_tool_messages):
            return None
        parser_cls = parser_for(server)
        try:
            plan = ToolPlan.build(body.tools, body.tool_choice, body.parallel_tool_calls,
                                  parser_cls)
        except ValueError as exc:
            param = "tool_choice" if "tool_choice" in str(exc) else "tools"
            raise APIError(400, str(exc), param=param) from exc
        return cls(plan, parser_cls)

    # ---- before generation ---------------------------------------------------------------------
    def encode(self, server, messages: list[dict]) -> list[int]:
        from jinja2 import TemplateError

        try:
            return encode_with_tools(server.prompts, messages, self.plan, self.parser_cls)
        except (TemplateError, TypeError, KeyError, ValueError) as exc:
            raise APIError(400, f"the chat template cannot render these messages and tools: "
                                f"{exc}", param="messages") from exc

    def adjust(self, gen: GenerationConfig) -> None:
        if self.plan is None:
            return
        guided = self.plan.guided()
        if guided is not None:
            if gen.guided is not None:
                raise APIError(400, "tool_choice 'required' or a named function constrains the "
                                    "output already; remove response_format",
                               param="response_format")
            gen.guided = guided
        if self.plan.keeps_special_tokens:
            gen.skip_special_tokens = False  # the parser must see the call markers

    # ---- after generation ----------------------------------------------------------------------
    def _parser(self, index: int) -> ToolCallParser | None:
        if index not in self.parsers:
            self.parsers[index] = self.plan.new_parser() if self.plan else None
        return self.parsers[index]

    def feed(self, index: int, text: str, finished: bool) -> ParsedDelta:
        """The next piece of choice `index` -> content and tool-call fragments."""
        parser = self._parser(index)
        if parser is None:
            return ParsedDelta(content=text)
        delta = parser.feed(text)
        if finished:
            delta.extend(parser.finish())
        if delta.tool_calls:
            self.called.add(index)
        return delta

    def finish_reason(self, index: int, engine_reason: str | None) -> str | None:
        return finish_reason(engine_reason, index in self.called)

    def message(self, index: int, text: str) -> tuple[str | None, list[dict] | None]:
        """A whole choice -> (content, tool_calls) of the assistant message."""
        delta = self.feed(index, text, finished=True)
        calls = [call.to_openai() for call in assemble(delta.tool_calls)]
        if not calls:
            return delta.content, None
        return delta.content or None, calls

    def stream_delta(self, index: int, text: str, finished: bool) -> dict | None:
        """The OpenAI `delta` for a streamed piece, None when there is nothing to send yet."""
        delta = self.feed(index, text, finished)
        out: dict = {}
        if delta.content:
            out["content"] = delta.content
        if delta.tool_calls:
            out["tool_calls"] = [call.to_openai() for call in _merged(delta.tool_calls)]
        return out or None


def _merged(deltas: list[ToolCallDelta]) -> list[ToolCallDelta]:
    """One entry per call in a chunk, as OpenAI sends them: fragments of a call joined."""
    merged: list[ToolCallDelta] = []
    for delta in deltas:
        if merged and merged[-1].index == delta.index:
            merged[-1] = ToolCallDelta(delta.index, merged[-1].id or delta.id,
                                       merged[-1].name or delta.name,
                                       merged[-1].arguments + delta.arguments)
        else:
            merged.append(delta)
    return merged
