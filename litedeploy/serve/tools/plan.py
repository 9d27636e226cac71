"""One request's tool calling: which tools, how the choice is enforced, how the prompt shows
them, which parser reads the output.

- `none`: the tools are still rendered (the model knows them, as in OpenAI's API and vLLM), the
  output is plain content and is not parsed.
- `auto`: the model writes calls in its own format; the family's parser extracts them.
- `required` / a named function: a JSON-schema grammar forces the calls (forced.py).

Templates that do not read `tools` (or `tool_calls`) get them as text in the parser's format: a
system prompt listing the tools, and past calls in the assistant's content.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from litedeploy.config import GuidedDecoding
from litedeploy.serve.tools.base import ToolCallParser
from litedeploy.serve.tools.forced import (
    NamedCallParser,
    RequiredCallsParser,
    named_schema,
    required_schema,
)
from litedeploy.serve.tools.hermes import HermesToolParser

CHOICES = ("none", "auto", "required")


def normalize_tool(tool: dict) -> dict:
    """An OpenAI tool -> `{"type": "function", "function": {name, description, parameters}}`
    (lmdeploy's field order, absent fields as None); ValueError names what is wrong."""
    if not isinstance(tool, dict) or tool.get("type", "function") != "function":
        raise ValueError('each tool must be {"type": "function", "function": {"name": ...}}')
    function = tool.get("function")
    if not isinstance(function, dict):
        raise ValueError('each tool needs a "function" object')  # noqa: TRY004 - a 400
    name = function.get("name")
    if not isinstance(name, str) or not name:
        raise ValueError("each tool function needs a non-empty string name")
    parameters = function.get("parameters")
    if parameters is not None and not isinstance(parameters, dict):
        raise ValueError(f"the parameters of tool {name!r} must be a JSON schema object")
    description = function.get("description")
    return {"type": "function",
            "function": {"name": name, "description": description, "parameters": parameters}}


def _choice_of(tool_choice: object) -> tuple[str, str | None]:
    if tool_choice is None:
        return "auto", None
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICES:
            raise ValueError(f"tool_choice must be one of {', '.join(CHOICES)} or "
                             '{"type": "function", "function": {"name": ...}}, '
                             f"got {tool_choice!r}")
        return tool_choice, None
    function = tool_choice.get("function") if isinstance(tool_choice, dict) else None
    name = function.get("name") if isinstance(function, dict) else None
    if not isinstance(name, str):
        # a 400 like every other bad field (not a TypeError)
        raise ValueError(  # noqa: TRY004
            'a named tool_choice is {"type": "function", "function": {"name": ...}}')
    return "function", name


@dataclass
class ToolPlan:
    tools: list[dict]
    choice: str  # none | auto | required | function
    function_name: str | None
    parallel: bool
    parser_cls: type[ToolCallParser] | None

    @classmethod
    def build(cls, tools: list | None, tool_choice: object = None,
              parallel_tool_calls: bool | None = None,
              parser_cls: type[ToolCallParser] | None = None) -> ToolPlan | None:
        """None when the request has no tools. ValueError (a 400) for a choice that cannot be
        honoured: a function not in tools, `auto` on a model without a parser."""
        if not tools:
            if tool_choice not in (None, "none"):
                raise ValueError("tool_choice needs tools; send `tools` or remove tool_choice")
            return None
        normalized = [normalize_tool(tool) for tool in tools]
        names = [tool["function"]["name"] for tool in normalized]
        if len(set(names)) < len(names):
            repeated = sorted({name for name in names if names.count(name) > 1})
            raise ValueError(f"tool names must be unique; repeated: {', '.join(repeated)}")
        choice, name = _choice_of(tool_choice)
        if name is not None and name not in names:
            raise ValueError(f"tool_choice names the function {name!r}, which is not in tools "
                             f"({', '.join(names)})")
        if choice == "auto" and parser_cls is None:
            raise ValueError(
                "tool_choice 'auto' needs a tool-call parser and this model type has no default "
                "one: start the server with --tool-call-parser, or use tool_choice 'required' "
                "or a named function")
        parallel = parallel_tool_calls is not False
        return cls(normalized, choice, name, parallel, parser_cls)

    @property
    def functions(self) -> list[dict]:
        return [tool["function"] for tool in self.tools]

    @property
    def names(self) -> list[str]:
        return [function["name"] for function in self.functions]

    def guided(self) -> GuidedDecoding | None:
        if self.choice == "required":
            return GuidedDecoding("json_schema", required_schema(self.functions, self.parallel))
        if self.choice == "function":
            function = next(f for f in self.functions if f["name"] == self.function_name)
            return GuidedDecoding("json_schema", named_schema(function))
        return None

    @property
    def keeps_special_tokens(self) -> bool:
        """InternLM2's call markers are special tokens: the parser must see them."""
        return self.choice == "auto" and getattr(self.parser_cls, "needs_special_tokens", False)

    def new_parser(self) -> ToolCallParser | None:
        """A fresh incremental parser for one choice of the reply (None: plain content)."""
        max_calls = None if self.parallel else 1
        if self.choice == "auto":
            return self.parser_cls(self.names, max_calls)
        if self.choice == "required":
            return RequiredCallsParser(self.names, max_calls)
        if self.choice == "function":
            return NamedCallParser(self.function_name)
        return None


def finish_reason(engine_reason: str | None, has_calls: bool) -> str | None:
    return "tool_calls" if has_calls and engine_reason == "stop" else engine_reason


def messages_for_template(messages: list[dict], tools: list[dict] | None, template,
                          parser_cls: type[ToolCallParser] | None) -> list[dict]:
    """Messages ready for `template`: call arguments as objects (what templates expect), and
    tools / past calls written as text in the parser's format where the template lacks them."""
    fmt = parser_cls or HermesToolParser
    fallback = not template.renders_tools
    out = []
    for message in messages:
        message = dict(message)
        calls = [_template_call(call) for call in message.get("tool_calls") or []]
        if calls and not template.renders_tool_calls:
            written = fmt.call_separator.join(fmt.format_call(c["function"]["name"], c["function"]["arguments"])
                              for c in calls)
            content = message.get("content") or ""
            message["content"] = content + (fmt.call_separator if content else "") + written
            message.pop("tool_calls")
        elif calls:
            message["tool_calls"] = calls
        if fallback and message["role"] == "tool" and fmt.tool_result_role:
            message["role"] = fmt.tool_result_role
        out.append(message)
    if tools and fallback:
        _add_tools_prompt(out, fmt.system_prompt(tools), fmt.tools_role)
    return out


def _add_tools_prompt(messages: list[dict], prompt: str, role: str | None) -> None:
    """Into the first system message, or (a format with its own role for it, InternLM2's
    `system name=<|plugin|>`) as a message of that role after it."""
    has_system = bool(messages) and messages[0]["role"] == "system"
    if role is not None:
        messages.insert(1 if has_system else 0, {"role": role, "content": prompt})
    elif has_system:
        messages[0] = {**messages[0],
                       "content": f"{messages[0].get('content') or ''}\n\n{prompt}".lstrip()}
    else:
        messages.insert(0, {"role": "system", "content": prompt})


def _template_call(call: dict) -> dict:
    function = call.get("function") or {}
    arguments = function.get("arguments")
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments)
        except json.JSONDecodeError:
            pass  # rendered as the string it is
    return {"id": call.get("id"), "type": "function",
            "function": {"name": function.get("name"), "arguments": arguments}}


def encode_with_tools(prompts, messages: list[dict], plan: ToolPlan | None,
                      parser_cls: type[ToolCallParser] | None) -> list[int]:
    """Messages (+ tools) -> token ids through a PromptEncoder's template."""
    if prompts.template is None:  # no tokenizer (--load-format dummy): its usual error
        return prompts.encode(messages)
    tools = plan.tools if plan else None
    template = prompts.template
    prepared = messages_for_template(messages, tools, template, parser_cls)
    template_tools = tools if template.renders_tools else None
    return template.encode(prompts.tokenizer, prepared, tools=template_tools)
