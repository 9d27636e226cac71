"""What every tool-call parser shares: the deltas it yields, and the scan of one JSON call.

A parser is incremental: `feed(text)` takes the next piece of the model's output and returns a
`ParsedDelta` (visible content, tool-call fragments); `finish()` flushes what was held back.
`parse(text)` is the same parser run once over the whole text, so a streamed reply reassembles
to exactly the non-streamed one, however the text was cut.

Arguments are the model's own JSON text of the arguments object, passed through as written (not
re-serialized), so argument fragments can be streamed as they arrive.
"""

from __future__ import annotations

import json
import uuid
from dataclasses import dataclass, field

# Keys under which a model writes a call's arguments (InternLM2 and Llama 3.1: "parameters").
ARGUMENT_KEYS = ("arguments", "parameters")
_decoder = json.JSONDecoder()
_WHITESPACE = " \t\n\r"


def new_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


@dataclass
class ToolCallDelta:
    """One fragment of OpenAI's `delta.tool_calls[i]`: id and name come once, first."""

    index: int
    id: str | None = None
    name: str | None = None
    arguments: str = ""

    def to_openai(self) -> dict:
        delta: dict = {"index": self.index}
        function: dict = {"arguments": self.arguments}
        if self.id is not None:
            delta.update(id=self.id, type="function")
        if self.name is not None:
            function = {"name": self.name, **function}
        delta["function"] = function
        return delta


@dataclass
class ToolCall:
    id: str
    name: str
    arguments: str

    def to_openai(self) -> dict:
        return {"id": self.id, "type": "function",
                "function": {"name": self.name, "arguments": self.arguments}}


@dataclass
class ParsedDelta:
    content: str = ""
    tool_calls: list[ToolCallDelta] = field(default_factory=list)

    def extend(self, other: ParsedDelta) -> ParsedDelta:
        self.content += other.content
        self.tool_calls += other.tool_calls
        return self


def assemble(deltas: list[ToolCallDelta]) -> list[ToolCall]:
    """Tool-call fragments -> whole calls, as an OpenAI client reassembles a stream."""
    calls: dict[int, ToolCall] = {}
    for delta in deltas:
        call = calls.setdefault(delta.index, ToolCall("", "", ""))
        call.id = delta.id or call.id
        call.name = delta.name or call.name
        call.arguments += delta.arguments
    return [calls[index] for index in sorted(calls)]


class ToolCallParser:
    """Base of the incremental parsers; `tool_names` (when given) are the callable names: a
    call to any other name is left in the content as the model wrote it."""

    name = "base"
    # For chat templates that do not render tools themselves (plan.messages_for_template):
    call_separator = "\n"  # between an assistant's content and its written calls (and calls)
    tools_role: str | None = None  # a role of its own for the tools prompt (else: system)
    tool_result_role: str | None = None  # the role tool results are written with

    def __init__(self, tool_names: list[str] | None = None, max_calls: int | None = None):
        self.tool_names = set(tool_names) if tool_names is not None else None
        self.max_calls = max_calls  # parallel_tool_calls=false: 1; later calls are dropped
        self.num_calls = 0

    def feed(self, text: str) -> ParsedDelta:
        raise NotImplementedError

    def finish(self) -> ParsedDelta:
        return ParsedDelta()

    def parse(self, text: str) -> tuple[str, list[ToolCall]]:
        """The whole output at once -> (content, calls)."""
        delta = self.feed(text).extend(self.finish())
        return delta.content, assemble(delta.tool_calls)

    def known(self, name: str) -> bool:
        return self.tool_names is None or name in self.tool_names

    def open_call(self) -> JsonCall:
        """A JsonCall for the next call; past max_calls it parses but emits nothing."""
        dropped = self.max_calls is not None and self.num_calls >= self.max_calls
        call = JsonCall(self.num_calls, emit=not dropped)
        self.num_calls += 0 if dropped else 1
        return call


def skip_whitespace(text: str, pos: int = 0) -> int:
    while pos < len(text) and text[pos] in _WHITESPACE:
        pos += 1
    return pos


def held_prefix_len(text: str, marker: str) -> int:
    """Length of the longest end of `text` that could be the start of `marker`: held back
    until the next piece tells whether the marker follows."""
    for size in range(min(len(marker) - 1, len(text)), 0, -1):
        if marker.startswith(text[-size:]):
            return size
    return 0


@dataclass
class CallScan:
    name: str | None = None
    args_start: int | None = None  # where the arguments value begins in the text
    args_end: int | None = None  # where it ends, once complete
    end: int | None = None  # one past the closing brace of the call object, once complete


def scan_call(text: str) -> CallScan:
    """Scan `{"name": ..., "arguments": {...}}` (text starts at the brace), complete or not.

    Only the top level is walked; each value is read by the standard JSON decoder, which fails
    on a value that is not complete yet, so a partial object yields what is known so far.
    """
    scan = CallScan()
    pos = skip_whitespace(text, 1)
    while pos < len(text):
        if text[pos] == "}":
            scan.end = pos + 1
            return scan
        if text[pos] == ",":
            pos = skip_whitespace(text, pos + 1)
        try:
            key, pos = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return scan
        pos = skip_whitespace(text, pos)
        if pos >= len(text) or text[pos] != ":" or not isinstance(key, str):
            return scan
        pos = skip_whitespace(text, pos + 1)
        if pos >= len(text):
            return scan
        if key in ARGUMENT_KEYS:
            scan.args_start = pos
        try:
            value, end = _decoder.raw_decode(text, pos)
        except json.JSONDecodeError:
            return scan
        if end == len(text) and isinstance(value, (int, float)):
            return scan  # a number at the end of the text may have more digits to come
        if key == "name" and isinstance(value, str):
            scan.name = value
        if key in ARGUMENT_KEYS:
            scan.args_end = end
        pos = skip_whitespace(text, end)
    return scan


class JsonCall:
    """One call object being streamed: emits its name once known, then its arguments text as
    it grows (held back until the name is known, whatever the key order)."""

    def __init__(self, index: int, emit: bool = True):
        self.index = index
        self.emit = emit
        self.id = new_call_id()
        self.text = ""
        self.scan = CallScan()
        self.name_sent = False
        self.num_args_sent = 0

    @property
    def complete(self) -> bool:
        return self.scan.end is not None

    def feed(self, text: str) -> str:
        """Take more of the object's text; returns what follows its closing brace, if any."""
        self.text += text
        self.scan = scan_call(self.text)
        if self.scan.end is None:
            return ""
        self.text, rest = self.text[:self.scan.end], self.text[self.scan.end:]
        return rest

    @property
    def rejected(self) -> bool:
        """Not a call after all: complete without a name (then it was just JSON)."""
        return self.complete and self.scan.name is None

    def arguments_so_far(self) -> str:
        scan = self.scan
        if scan.args_start is None:
            return "{}" if self.complete else ""
        stop = scan.args_end if scan.args_end is not None else len(self.text)
        return self.text[scan.args_start:stop]

    def deltas(self) -> list[ToolCallDelta]:
        if not self.emit or self.scan.name is None:
            return []
        out = []
        if not self.name_sent:
            self.name_sent = True
            out.append(ToolCallDelta(self.index, self.id, self.scan.name, ""))
        arguments = self.arguments_so_far()
        if len(arguments) > self.num_args_sent:
            out.append(ToolCallDelta(self.index, arguments=arguments[self.num_args_sent:]))
            self.num_args_sent = len(arguments)
        return out
