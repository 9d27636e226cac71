"""Incremental detokenization: token ids in, UTF-8-safe text deltas out.

Decoding one token at a time is wrong twice over: a character may span several byte tokens, and
SentencePiece-style decoders drop the leading space of whatever comes first in a decode call. So,
like vLLM and TGI, we decode a short window that starts a few tokens back (`prefix_offset`) and
emit only what lies past the text already emitted from it (`read_offset`). Cost per token is
O(window), not O(sequence).
"""

from __future__ import annotations

from collections.abc import Iterable

from litedeploy.tokenizer import Tokenizer

REPLACEMENT_CHAR = "\ufffd"
# Prompt tokens kept as context for the first generated token (vLLM uses the same 5).
NUM_CONTEXT_TOKENS = 5
# A window that has not produced clean text after this many tokens (only garbage bytes or runs of
# skipped special tokens do that) is flushed anyway, so the window stays bounded.
MAX_PENDING_TOKENS = 16


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas.

    Invariant: `text` (the concatenation of every delta) equals `tokenizer.decode(token_ids)`,
    except that a tail decoding to U+FFFD (an unfinished multi-byte character) is held back until
    the next token completes it. With `prefix_ids` (the prompt), the first generated token is
    decoded in the prompt's context, so a SentencePiece leading space is kept: `text` then equals
    `decode(prefix + token_ids)` minus `decode(prefix)`.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        skip_special_tokens: bool = True,
        prefix_ids: list[int] | None = None,
    ) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.token_ids: list[int] = []
        self.text = ""
        context = list(prefix_ids[-NUM_CONTEXT_TOKENS:]) if prefix_ids else []
        # _window holds ids from prefix_offset on; text for _window[:_read_offset] is emitted.
        self._window: list[int] = context
        self._read_offset = len(context)
        self._prefix_text = self._decode(context)

    def add(self, token_id: int) -> str:
        """Append one token; return the newly decodable text (may be "")."""
        self.token_ids.append(token_id)
        self._window.append(token_id)
        window_text = self._decode(self._window)
        pending_tokens = len(self._window) - self._read_offset
        grew = len(window_text) > len(self._prefix_text)
        if not grew and pending_tokens < MAX_PENDING_TOKENS:
            return ""  # e.g. a skipped special token: keep the window start where it is
        if window_text.endswith(REPLACEMENT_CHAR) and pending_tokens < MAX_PENDING_TOKENS:
            return ""  # an unfinished UTF-8 character: wait for its remaining bytes
        delta = window_text[len(self._prefix_text) :]
        # Slide: the tokens just read become the next window's context.
        self._window = self._window[self._read_offset :]
        self._read_offset = len(self._window)
        self._prefix_text = self._decode(self._window)
        self.text += delta
        return delta

    def peek(self) -> str:
        """Text held back so far (decoded as `decode` would), without consuming it."""
        return self._decode(self._window)[len(self._prefix_text) :]

    def flush(self) -> str:
        """End of the stream: emit what is held back, as `decode` renders it (an unfinished
        character becomes U+FFFD), so that `text == decode(token_ids)` afterwards."""
        window_text = self._decode(self._window)
        delta = window_text[len(self._prefix_text) :]
        self._window = self._window[len(self._window) :]
        self._read_offset = 0
        self._prefix_text = ""
        self.text += delta
        return delta

    def add_many(self, token_ids: Iterable[int]) -> str:
        return "".join(self.add(token_id) for token_id in token_ids)

    def _decode(self, ids: list[int]) -> str:
        if not ids:
            return ""
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)
