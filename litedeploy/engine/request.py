"""Per-request state kept by the engine: generation settings, detokenizer, stop handling, outputs."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from litedeploy.config import GenerationConfig
from litedeploy.engine.detokenizer import IncrementalDetokenizer
from litedeploy.engine.prompt_logprobs import (
    PromptLogprob,
    PromptLogprobsProgress,
    take_prompt_logprobs,
)
from litedeploy.engine.sampler import SampledToken


@dataclass
class RequestOutput:
    """An incremental result: what is new since the previous output of the same request."""

    request_id: str
    text: str
    token_ids: list[int]
    logprobs: list[SampledToken] | None
    finished: bool
    finish_reason: str | None  # "stop" | "length" | "abort" | "error"
    input_token_len: int
    generate_token_len: int
    num_cached_tokens: int = 0
    error: str | None = None
    # with GenerationConfig.prompt_logprobs: one entry per prompt token (the first None), on the
    # first output after the prefill and again on the final one
    prompt_logprobs: list[PromptLogprob | None] | None = None


@dataclass
class RequestState:
    request_id: str
    gen: GenerationConfig
    prompt_ids: list[int]
    stop_ids: frozenset[int]
    detokenizer: IncrementalDetokenizer | None
    output_ids: list[int] = field(default_factory=list)
    text: str = ""
    num_sent_chars: int = 0
    num_sent_tokens: int = 0
    pending_logprobs: list[SampledToken] = field(default_factory=list)
    finish_reason: str | None = None
    prompt_logprobs: PromptLogprobsProgress | None = None  # filled chunk by chunk
    guided: Any = None  # engine.guided.GuidedMatcher of a structured-output request
    error: str | None = None

    def add_token(self, sampled: SampledToken, max_new_tokens: int) -> None:
        """Account for one sampled token; sets finish_reason when the request is done."""
        token_id = sampled.token_id
        if token_id in self.stop_ids:
            self.finish_reason = "stop"  # stop tokens are not part of the output
            self._flush_text()
            return
        self.output_ids.append(token_id)
        if self.gen.logprobs is not None:
            self.pending_logprobs.append(sampled)
        if self.detokenizer is not None:
            self.text += self.detokenizer.add(token_id)
            if self._cut_at_stop_word():
                self.finish_reason = "stop"
                return
        if self.guided is not None and self._grammar_ends(token_id):
            return
        if len(self.output_ids) >= max_new_tokens:
            self.finish_reason = "length"
            self._flush_text()

    def _grammar_ends(self, token_id: int) -> bool:
        """Advance the grammar; True when the request ends here (grammar complete, or a token
        it rejected, which the sampler's mask should have made impossible)."""
        if not self.guided.accept(token_id):
            self.finish_reason = "error"
            self.error = f"token {token_id} does not follow the requested grammar: " + (
                self.guided.error.splitlines()[0])
        elif self.guided.must_stop():
            self.finish_reason = "stop"
        else:
            return False
        self._flush_text()
        return True

    def _flush_text(self) -> None:
        if self.detokenizer is not None:
            self.text += self.detokenizer.flush()

    def _cut_at_stop_word(self) -> bool:
        if not self.gen.stop_words:
            return False
        # include text the detokenizer holds back (an unfinished character after the stop word)
        text = self.text + self.detokenizer.peek()
        for word in self.gen.stop_words:
            # search only the tail that can hold a stop word completed by the newest text
            index = text.find(word, max(0, self.num_sent_chars - len(word)))
            if index >= 0:
                self.text = text[:index]
                return True
        return False

    def _holdback(self) -> int:
        """Characters at the end of the text that may be the start of a stop word."""
        longest = 0
        for word in self.gen.stop_words or ():
            for size in range(min(len(word) - 1, len(self.text)), longest, -1):
                if self.text.endswith(word[:size]):
                    longest = size
                    break
        return longest

    def take_output(self, num_cached_tokens: int) -> RequestOutput:
        finished = self.finish_reason is not None
        end = len(self.text) if finished else len(self.text) - self._holdback()
        text = self.text[self.num_sent_chars:end]
        self.num_sent_chars = max(self.num_sent_chars, end)
        token_ids = self.output_ids[self.num_sent_tokens:]
        self.num_sent_tokens = len(self.output_ids)
        logprobs = self.pending_logprobs if self.gen.logprobs is not None else None
        self.pending_logprobs = []
        return RequestOutput(
            self.request_id, text, token_ids, logprobs, finished, self.finish_reason,
            len(self.prompt_ids), len(self.output_ids), num_cached_tokens, self.error,
            prompt_logprobs=take_prompt_logprobs(self),
        )
