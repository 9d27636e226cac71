"""Structured output: grammar masks from xgrammar, applied by the sampler to the rows that carry
a grammar (JSON schema, JSON object, regex, choice, EBNF grammar). See compiler.py for where
compilation runs and matcher.py for the per-request state."""

from __future__ import annotations

from litedeploy.config import GuidedDecoding
from litedeploy.engine.guided.compiler import GrammarCache
from litedeploy.engine.guided.matcher import GuidedMatcher, apply_token_bitmask
from litedeploy.tokenizer import Tokenizer

__all__ = ["GrammarCache", "GuidedMatcher", "apply_token_bitmask", "compile_check",
           "register_cache"]

# id(tokenizer) -> the cache of the engine serving it, so front-ends' checks warm that cache
_CACHES: dict[int, GrammarCache] = {}


def register_cache(cache: GrammarCache) -> None:
    if cache.tokenizer is not None:
        _CACHES[id(cache.tokenizer)] = cache


def compile_check(tokenizer: Tokenizer, guided: GuidedDecoding) -> None:
    """Raise RequestError (the library's reason) if `guided` cannot be compiled for this
    tokenizer. For front-ends that validate before they build a request; the engine checks
    again on its own (from its cache) when the request arrives."""
    cache = _CACHES.get(id(tokenizer))
    if cache is None or cache.tokenizer is not tokenizer:
        cache = GrammarCache(tokenizer, tokenizer.vocab_size, _stop_ids(tokenizer), max_threads=1)
        register_cache(cache)
    cache.get(guided)


def _stop_ids(tokenizer: Tokenizer) -> list[int]:
    return [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
