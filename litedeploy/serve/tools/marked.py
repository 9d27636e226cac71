"""Calls wrapped in markers: `<tool_call>{...}</tool_call>` (Hermes, Qwen2) and
`<|action_start|><|plugin|>{...}<|action_end|>` (InternLM2). Text outside the markers is content.
"""

from __future__ import annotations

from litedeploy.serve.tools.base import (
    JsonCall,
    ParsedDelta,
    ToolCallParser,
    held_prefix_len,
    skip_whitespace,
)


class MarkedCallParser(ToolCallParser):
    opener = ""
    closer = ""

    def __init__(self, tool_names: list[str] | None = None, max_calls: int | None = None):
        super().__init__(tool_names, max_calls)
        self.mode = "text"  # text | open (after the opener) | call | close (after the object)
        self.buffer = ""
        self.call: JsonCall | None = None
        self.raw_call = ""  # the opener and what followed, restored as content if no call
        self.after_call = False  # whitespace between calls (and after the last) is dropped

    def feed(self, text: str) -> ParsedDelta:
        out = ParsedDelta()
        self.buffer += text
        while self.buffer and self._step(out):
            pass
        return out

    def finish(self) -> ParsedDelta:
        out = ParsedDelta()
        if self.mode == "text" and not (self.after_call and not self.buffer.strip()):
            out.content += self.buffer
        elif self.mode == "open" or (self.mode == "call" and not self.call.name_sent):
            out.content += self.raw_call + self.buffer  # an opener that no call followed
        self.buffer = ""
        return out

    # ---- one transition per call; False: wait for more text ----------------------------------
    def _step(self, out: ParsedDelta) -> bool:
        return getattr(self, f"_{self.mode}")(out)

    def _text(self, out: ParsedDelta) -> bool:
        if self.after_call:
            start = skip_whitespace(self.buffer)
            rest = self.buffer[start:]
            if not rest or (self.opener.startswith(rest) and rest != self.opener):
                return False
            if rest.startswith(self.opener):
                self.buffer = rest
            self.after_call = False
        index = self.buffer.find(self.opener)
        if index < 0:
            keep = held_prefix_len(self.buffer, self.opener)
            out.content += self.buffer[:len(self.buffer) - keep]
            self.buffer = self.buffer[len(self.buffer) - keep:]
            return False
        out.content += self.buffer[:index]
        self.raw_call = self.opener
        self.buffer = self.buffer[index + len(self.opener):]
        self.mode = "open"
        return True

    def _open(self, out: ParsedDelta) -> bool:
        start = skip_whitespace(self.buffer)
        if start == len(self.buffer):
            return False
        if self.buffer[start] != "{":  # not a JSON call: the opener was just text
            out.content += self.raw_call
            self.mode = "text"
            return True
        self.raw_call += self.buffer[:start]
        self.call = self.open_call()
        self.buffer = self.buffer[start:]
        self.mode = "call"
        return True

    def _call(self, out: ParsedDelta) -> bool:
        call = self.call
        rest = call.feed(self.buffer)
        self.buffer = ""
        name = call.scan.name
        if call.rejected or (name is not None and not call.name_sent and not self.known(name)):
            out.content += self.raw_call + call.text  # JSON that is no call of ours: content
            self.buffer = rest
            self.mode = "text"
            self.num_calls -= call.emit
            return bool(rest)
        out.tool_calls += call.deltas()
        if call.complete:
            self.buffer = rest
            self.mode = "close"
            return bool(rest)
        return False

    def _close(self, out: ParsedDelta) -> bool:
        start = skip_whitespace(self.buffer)
        rest = self.buffer[start:]
        if not rest or (self.closer.startswith(rest) and rest != self.closer):
            return False
        rest = rest.removeprefix(self.closer)
        self.buffer = rest
        self.mode = "text"
        self.after_call = True
        return bool(rest)
