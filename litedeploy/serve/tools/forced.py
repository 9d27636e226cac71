"""`tool_choice: "required"` and a named function, enforced with a JSON-schema grammar (as vLLM
does) rather than hoped for: the output is JSON, parsed straight into tool calls.

- required: an array of `{"name": <a tool>, "parameters": <that tool's arguments>}` (at least
  one; exactly one with parallel_tool_calls false);
- named: the arguments object of that one function.
"""

from __future__ import annotations

import json

from litedeploy.serve.tools.base import (
    ParsedDelta,
    ToolCallDelta,
    ToolCallParser,
    new_call_id,
    skip_whitespace,
)
from litedeploy.serve.tools.sequence import JsonSequenceParser

# A function without a parameters schema takes any JSON object.
_ANY_OBJECT = {"type": "object"}


def parameters_of(function: dict) -> dict:
    return function.get("parameters") or _ANY_OBJECT


def required_schema(functions: list[dict], parallel: bool = True) -> str:
    """One of the tools, by name, with its own arguments schema; an array of such calls."""
    call = {"anyOf": [{
        "type": "object",
        "properties": {"name": {"type": "string", "enum": [function["name"]]},
                       "parameters": parameters_of(function)},
        "required": ["name", "parameters"],
    } for function in functions]}
    array: dict = {"type": "array", "items": call, "minItems": 1}
    if not parallel:
        array["maxItems"] = 1
    return json.dumps(array, ensure_ascii=False)


def named_schema(function: dict) -> str:
    return json.dumps(parameters_of(function), ensure_ascii=False)


class RequiredCallsParser(JsonSequenceParser):
    """The guided array `[{"name": ..., "parameters": {...}}, ...]`."""

    name = "required"
    opener = "["
    opener_required = True
    separator = ","
    closer = "]"


class NamedCallParser(ToolCallParser):
    """The whole output is the arguments of one call to a known function."""

    name = "named"

    def __init__(self, function_name: str):
        super().__init__([function_name], 1)
        self.function_name = function_name
        self.started = False

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        if not self.started:
            text = text[skip_whitespace(text):]  # the grammar may allow leading whitespace
            if not text:
                return out
            self.started = True
            self.num_calls = 1
            out.tool_calls.append(ToolCallDelta(0, new_call_id(), self.function_name, ""))
        if text:
            out.tool_calls.append(ToolCallDelta(0, arguments=text))
        return out

    def finish(self) -> ParsedDelta:
        if self.started:
            return ParsedDelta()
        self.started = True  # nothing was generated (max_tokens): still the call it must be
        return ParsedDelta(tool_calls=[ToolCallDelta(0, new_call_id(), self.function_name, "")])
