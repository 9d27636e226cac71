"""Compiled grammars, cached per (kind, spec) and compiled in a thread pool.

The library is llguidance (benchmarks/results/guided-library-choice.md says why). "Compiling"
here means: turn the constraint into a llguidance grammar, validate it against our vocabulary,
build a matcher and compute its first mask. That matcher is the cache entry; each request takes a
`deep_copy()` of it (cheap: the lexer and grammar are shared). A large schema takes milliseconds
to tens of milliseconds, so this never runs on the engine's step loop: AsyncEngine awaits
`compile_async` before it queues the request, which then finds its grammar in the cache.
A constraint the library rejects is a RequestError (HTTP 400) with the library's reason; the
parser limits bound the work of every later mask, so no regex or grammar can stall a step.
"""

from __future__ import annotations

import concurrent.futures
import json
import threading
from collections import OrderedDict
from typing import Any

from litedeploy.config import GuidedDecoding
from litedeploy.errors import RequestError
from litedeploy.tokenizer import Tokenizer

CACHE_SIZE = 128
COMPILE_TIMEOUT_S = 30.0
# compact JSON (", " and ": ", no free whitespace): small models otherwise may emit
# whitespace forever, and every token goes to content
JSON_DEFAULTS = {"whitespace_flexible": False, "item_separator": ", ", "key_separator": ": "}


class GrammarCache:
    """LRU of compiled grammars for one tokenizer vocabulary; thread-safe."""

    def __init__(self, tokenizer: Tokenizer | None, vocab_size: int,
                 stop_token_ids: list[int], max_threads: int = 2) -> None:
        self.tokenizer = tokenizer
        self.vocab_size = vocab_size
        self.stop_token_ids = stop_token_ids
        self._lock = threading.Lock()
        self._vocab: Any = None  # llguidance.LLTokenizer, built on first use (~1-2 s)
        self._vocab_future: concurrent.futures.Future | None = None
        self._vocab_lock = threading.Lock()  # held for seconds: never by the event loop
        self._entries: OrderedDict[GuidedDecoding, concurrent.futures.Future] = OrderedDict()
        self._pool = concurrent.futures.ThreadPoolExecutor(
            max_threads, thread_name_prefix="litedeploy-grammar")

    def compile_async(self, guided: GuidedDecoding) -> concurrent.futures.Future:
        """A future of the compiled grammar; one compilation per (kind, spec) at a time."""
        self._check_tokenizer()
        with self._lock:
            future = self._entries.get(guided)
            if future is not None:
                self._entries.move_to_end(guided)
                return future
            future = self._pool.submit(self._compile, guided)
            self._entries[guided] = future
            while len(self._entries) > CACHE_SIZE:
                self._entries.popitem(last=False)
        future.add_done_callback(lambda f: self._forget_failure(guided, f))
        return future

    def _check_tokenizer(self) -> None:
        if self.tokenizer is None:
            raise RequestError("structured output needs a tokenizer; this model was loaded "
                               "without one (--load-format dummy and no tokenizer files)")

    def vocab_ready(self) -> concurrent.futures.Future:
        """The vocabulary (built once, on the pool: seconds for a large one). Compile timeouts
        start when it is ready: it is not the constraint's fault."""
        self._check_tokenizer()
        with self._lock:
            if self._vocab_future is None:
                self._vocab_future = self._pool.submit(self.vocab)
            return self._vocab_future

    def get(self, guided: GuidedDecoding, timeout_s: float = COMPILE_TIMEOUT_S) -> Any:
        """The compiled grammar (blocks while it compiles); RequestError if it cannot be."""
        self.vocab_ready().result()
        future = self.compile_async(guided)
        try:
            return future.result(timeout=timeout_s)
        except concurrent.futures.TimeoutError:
            raise RequestError(
                f"compiling the {guided.kind} constraint took longer than {timeout_s:.0f} s; "
                "simplify the schema or pattern") from None

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---- on a pool thread ------------------------------------------------------------------
    def _compile(self, guided: GuidedDecoding) -> Any:
        import llguidance

        vocab = self.vocab()
        try:
            grammar = to_llguidance_grammar(guided)
            error = llguidance.LLMatcher.validate_grammar(grammar, vocab)
        except RequestError:
            raise
        except Exception as exc:  # noqa: BLE001 - the library raises ValueError/TypeError/...
            raise RequestError(f"invalid {guided.kind} constraint: {exc}") from None
        if error:
            raise RequestError(f"invalid {guided.kind} constraint: {error.strip()}")
        matcher = llguidance.LLMatcher(vocab, grammar, log_level=0)
        _check_first_mask(matcher, self.vocab_size, guided)
        return matcher

    def vocab(self) -> Any:
        with self._vocab_lock:
            if self._vocab is None:
                from litedeploy.engine.guided.vocab import grammar_tokenizer

                try:
                    import llguidance  # noqa: F401
                except ImportError:
                    raise RequestError("structured output needs the llguidance package: "
                                       "pip install llguidance") from None
                self._vocab = grammar_tokenizer(self.tokenizer, self.vocab_size,
                                                self.stop_token_ids)
            return self._vocab

    def _forget_failure(self, guided: GuidedDecoding, future: concurrent.futures.Future) -> None:
        # a failed compile is not cached: the next request gets the same error, freshly
        if future.cancelled() or future.exception() is not None:
            with self._lock:
                if self._entries.get(guided) is future:
                    del self._entries[guided]


def to_llguidance_grammar(guided: GuidedDecoding) -> str:
    import llguidance

    if guided.kind == "json_schema":
        schema = _loads(guided.spec, "json_schema", dict)
        return llguidance.LLMatcher.grammar_from_json_schema(schema, defaults=JSON_DEFAULTS)
    if guided.kind == "json_object":
        return llguidance.LLMatcher.grammar_from_json_schema({"type": "object"},
                                                             defaults=JSON_DEFAULTS)
    if guided.kind == "regex":
        return llguidance.LLMatcher.grammar_from_regex(guided.spec)
    if guided.kind == "choice":
        return llguidance.LLMatcher.grammar_from_lark(
            choice_grammar(_loads(guided.spec, "choice", list)))
    spec = guided.spec  # "grammar": Lark, or GBNF/EBNF (`root ::= ...`) as llama.cpp writes it
    if "::=" in spec:
        from llguidance.gbnf_to_lark import gbnf_to_lark

        try:
            spec = gbnf_to_lark(spec)
        except Exception as exc:  # noqa: BLE001 - the converter raises plain exceptions
            raise RequestError(f"invalid grammar constraint: {exc}") from None
    return llguidance.LLMatcher.grammar_from_lark(spec)


def choice_grammar(choices: list) -> str:
    """Lark whose start is exactly one of the choices (JSON string literals are Lark ones)."""
    if not choices or not all(isinstance(c, str) and c for c in choices):
        raise RequestError("guided_choice must be a non-empty list of non-empty strings")
    return "start: " + " | ".join(json.dumps(c, ensure_ascii=False) for c in choices)


def _loads(spec: str | None, kind: str, expected: type) -> Any:
    try:
        value = json.loads(spec or "")
    except json.JSONDecodeError as exc:
        raise RequestError(f"the {kind} constraint is not valid JSON: {exc}") from None
    if not isinstance(value, expected):
        raise RequestError(f"the {kind} constraint must be a JSON {expected.__name__}")
    return value


def _check_first_mask(matcher: Any, vocab_size: int, guided: GuidedDecoding) -> None:
    """A grammar whose first token can be nothing would leave the sampler no choice."""
    import torch

    from litedeploy.engine.guided.matcher import num_bitmask_words

    bitmask = torch.zeros(1, num_bitmask_words(vocab_size), dtype=torch.int32)
    matcher.unsafe_compute_mask_ptr(bitmask.data_ptr(), bitmask.numel() * 4)
    if matcher.is_error() or not bitmask.any():
        raise RequestError(f"the {guided.kind} constraint matches no text at all")
