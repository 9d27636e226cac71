"""Outputs that are nothing but calls: JSON objects after an optional opener, with a separator
between them. Llama 3.1 (`{...}; {...}`, maybe after `<|python_tag|>`) and the forced
`tool_choice: "required"` array (`[{...}, {...}]`). Output that does not start like that is
content, untouched.
"""

from __future__ import annotations

from litedeploy.serve.tools.base import JsonCall, ParsedDelta, ToolCallParser, skip_whitespace


class JsonSequenceParser(ToolCallParser):
    opener = ""  # consumed before the first call when present
    opener_required = False
    separator = ";"
    closer = ""  # ends the sequence (the array's "]")

    def __init__(self, tool_names: list[str] | None = None, max_calls: int | None = None):
        super().__init__(tool_names, max_calls)
        self.mode = "start"  # start | open (before an object) | call | sep | plain | done
        self.buffer = ""
        self.raw = ""  # everything consumed, restored as content if it was no call after all
        self.call: JsonCall | None = None

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self.buffer += text
        while self.buffer and getattr(self, f"_{self.mode}")(out):
            pass
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.mode in ("start", "plain") or (self.mode == "open" and self.num_calls == 0):
            out.content = self.raw + self.buffer
        elif self.mode == "call" and not self.call.name_sent and self.num_calls <= 1:
            out.content = self.raw + self.call.text
        self.buffer = ""
        return out

    def _consume(self, size: int) -> None:
        self.raw += self.buffer[:size]
        self.buffer = self.buffer[size:]

    def _to_plain(self, out: ParsedDelta) -> bool:
        """Not a sequence of calls: everything so far and after is content."""
        out.content += self.raw + self.buffer
        self.raw = self.buffer = ""
        self.mode = "plain"
        return False

    def _start(self, out: ParsedDelta) -> bool:
        start = skip_whitespace(self.buffer)
        rest = self.buffer[start:]
        if not rest or (self.opener and self.opener.startswith(rest) and rest != self.opener):
            return False
        if self.opener and rest.startswith(self.opener):
            self._consume(start + len(self.opener))
        elif self.opener_required or rest[0] != "{":
            return self._to_plain(out)
        self.mode = "open"
        return True

    def _open(self, out: ParsedDelta) -> bool:
        start = skip_whitespace(self.buffer)
        if start == len(self.buffer):
            return False
        if self.closer and self.buffer[start] == self.closer:
            self._consume(start + 1)
            self.mode = "done"
            return False
        if self.buffer[start] != "{":
            return self._to_plain(out) if self.num_calls == 0 else self._trailing(out, start)
        self._consume(start)
        self.call = self.open_call()
        self.mode = "call"
        return True

    def _call(self, out: ParsedDelta) -> bool:
        call = self.call
        rest = call.feed(self.buffer)
        self.buffer = ""
        name = call.scan.name
        if call.rejected or (name is not None and not call.name_sent and not self.known(name)):
            self.num_calls -= call.emit
            self.buffer = call.text + rest
            return self._to_plain(out) if self.num_calls == 0 else self._trailing(out, 0)
        out.tool_calls += call.deltas()
        if not call.complete:
            return False
        self.raw += call.text
        self.buffer = rest
        self.mode = "sep"
        return bool(rest)

    def _sep(self, out: ParsedDelta) -> bool:
        start = skip_whitespace(self.buffer)
        if start == len(self.buffer):
            return False
        char = self.buffer[start]
        if char == self.separator:
            self._consume(start + 1)
            self.mode = "open"
            return True
        if self.closer and char == self.closer:
            self._consume(start + 1)
            self.mode = "done"
            return False
        return self._trailing(out, start)

    def _trailing(self, out: ParsedDelta, start: int) -> bool:
        """Text after the calls: content (whitespace before it dropped)."""
        self.buffer = self.buffer[start:]
        self.raw = ""
        return self._to_plain(out)

    def _plain(self, out: ParsedDelta) -> bool:
        out.content += self.buffer
        self.buffer = ""
        return False

    def _done(self, out: ParsedDelta) -> bool:
        self.buffer = ""  # nothing may follow the closed array
        return False
