"""xgrammar vs llguidance on this machine: compile time, batched mask time, JSON-schema coverage.

Run: python benchmarks/guided_library_choice.py [MODEL]  (default: the embedded SmolLM2 GGUF)
Prints one JSON object; the figures in benchmarks/results/guided-library-choice.md come from it.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

import torch

from litedeploy.loader.model_loader import open_source
from litedeploy.model_bundle import _load_tokenizer, resolve_model_path

TYPICAL = {
    "type": "object",
    "properties": {
        "name": {"type": "string"},
        "age": {"type": "integer", "minimum": 0},
        "email": {"type": "string"},
        "tags": {"type": "array", "items": {"type": "string"}},
        "address": {"type": "object", "properties": {"city": {"type": "string"},
                                                     "zip": {"type": "string"}},
                    "required": ["city", "zip"]},
    },
    "required": ["name", "age", "email", "tags", "address"],
}
TYPICAL_INSTANCE = {"name": "Ada Lovelace", "age": 36, "email": "ada@example.com",
                    "tags": ["math", "engines", "poetry"],
                    "address": {"city": "London", "zip": "W1"}}
COVERAGE = {
    "nested objects": ({"type": "object", "properties": {"a": {"type": "object", "properties": {
        "b": {"type": "object", "properties": {"c": {"type": "integer"}}, "required": ["c"]}},
        "required": ["b"]}}, "required": ["a"]}, '{"a": {"b": {"c": 1}}}', '{"a": {"b": {}}}'),
    "enum": ({"type": "object", "properties": {"color": {"enum": ["red", "green"]}},
              "required": ["color"]}, '{"color": "red"}', '{"color": "blue"}'),
    "array minItems": ({"type": "array", "items": {"type": "integer"}, "minItems": 2},
                       "[1, 2]", "[1]"),
    "anyOf": ({"anyOf": [{"type": "integer"}, {"type": "object", "properties": {
        "x": {"type": "boolean"}}, "required": ["x"]}]}, '{"x": true}', '{"x": 1}'),
    "$ref": ({"$defs": {"pt": {"type": "object", "properties": {"x": {"type": "number"}},
                               "required": ["x"]}},
              "type": "object", "properties": {"p": {"$ref": "#/$defs/pt"}}, "required": ["p"]},
             '{"p": {"x": 1.5}}', '{"p": {"y": 1}}'),
    "pattern string": ({"type": "object", "properties": {"id": {"type": "string",
                                                               "pattern": "^[A-Z]{2}[0-9]{3}$"}},
                        "required": ["id"]}, '{"id": "AB123"}', '{"id": "ab123"}'),
    # a raw control character is never valid JSON inside a string
    "string maxLength": ({"type": "object", "properties": {"s": {"type": "string",
                                                                "maxLength": 6}},
                          "required": ["s"]}, '{"s": "abc"}', '{"s": "a\x10b"}'),
    "integer range": ({"type": "object", "properties": {"n": {"type": "integer", "minimum": 5,
                                                              "maximum": 20}},
                       "required": ["n"]}, '{"n": 17}', '{"n": 21}'),
}
BATCH = 32


def timed(fn, repeat: int = 1) -> float:
    """Median wall time of fn() in milliseconds."""
    times = []
    for _ in range(repeat):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def walk(matchers, token_ids, fill, accept) -> float:
    """Mean ms to fill the masks of the whole batch per step while every matcher advances
    through the instance one token a step (fresh states each step, as in decoding)."""
    total = 0.0
    for token_id in token_ids:
        start = time.perf_counter()
        for i, m in enumerate(matchers):
            fill(m, i)
        total += time.perf_counter() - start
        for m in matchers:
            assert accept(m, token_id)
    return total * 1e3 / len(token_ids)


def xgrammar_figures(hf, vocab_size: int, token_ids: list[int]) -> dict:
    import xgrammar as xgr

    out = {}
    start = time.perf_counter()
    info = xgr.TokenizerInfo.from_huggingface(hf, vocab_size=vocab_size)
    compiler = xgr.GrammarCompiler(info, cache_enabled=False)
    out["vocab_setup_ms"] = (time.perf_counter() - start) * 1e3
    schema = json.dumps(TYPICAL)
    out["compile_typical_ms"] = timed(lambda: compiler.compile_json_schema(schema), 3)
    out["compile_json_object_ms"] = timed(lambda: compiler.compile_builtin_json_grammar(), 3)
    compiled = compiler.compile_json_schema(schema)
    matchers = [xgr.GrammarMatcher(compiled) for _ in range(BATCH)]
    bitmask = xgr.allocate_token_bitmask(BATCH, vocab_size)
    # each matcher sits at a different point of the instance, as in a busy batch
    for i, m in enumerate(matchers):
        for t in token_ids[: i * len(token_ids) // BATCH]:
            assert m.accept_token(t)
    def fill_all():
        for i, m in enumerate(matchers):
            m.fill_next_token_bitmask(bitmask, i)
    out["mask_batch32_serial_ms"] = timed(fill_all, 20)
    out["mask_batch32_walk_ms"] = walk(
        [xgr.GrammarMatcher(compiled) for _ in range(BATCH)], token_ids,
        lambda m, i: m.fill_next_token_bitmask(bitmask, i), lambda m, t: m.accept_token(t))
    batch = xgr.BatchGrammarMatcher(max_threads=2)
    out["mask_batch32_batched_ms"] = timed(
        lambda: batch.batch_fill_next_token_bitmask(matchers, bitmask), 20)
    logits = torch.randn(BATCH, vocab_size)
    out["apply_mask_batch32_ms"] = timed(
        lambda: xgr.apply_token_bitmask_inplace(logits, bitmask), 20)
    out["coverage"] = {}
    for name, (sch, good, bad) in COVERAGE.items():
        try:
            cg = compiler.compile_json_schema(json.dumps(sch))
        except Exception as exc:  # noqa: BLE001 - recorded as "fails to compile"
            out["coverage"][name] = f"compile error: {exc}"[:120]
            continue
        ok_good = xgr.GrammarMatcher(cg).accept_string(good)
        m = xgr.GrammarMatcher(cg)
        ok_bad = m.accept_string(bad) and m.is_completed()
        out["coverage"][name] = "ok" if ok_good and not ok_bad else (
            f"accepts valid={ok_good}, accepts invalid={ok_bad}")
    return out


def llguidance_figures(hf, vocab_size: int, token_ids: list[int]) -> dict:
    import llguidance
    import llguidance.hf
    import llguidance.torch as lt

    out = {}
    start = time.perf_counter()
    tok = llguidance.hf.from_tokenizer(hf, n_vocab=vocab_size)
    out["vocab_setup_ms"] = (time.perf_counter() - start) * 1e3
    grammar = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(TYPICAL))
    # llguidance compiles lazily: building the matcher is the compile step
    out["compile_typical_ms"] = timed(lambda: llguidance.LLMatcher(tok, grammar), 3)
    json_object = llguidance.LLMatcher.grammar_from_json_schema('{"type": "object"}')
    out["compile_json_object_ms"] = timed(lambda: llguidance.LLMatcher(tok, json_object), 3)
    matchers = [llguidance.LLMatcher(tok, grammar) for _ in range(BATCH)]
    for i, m in enumerate(matchers):
        prefix = token_ids[: i * len(token_ids) // BATCH]
        assert m.consume_tokens(prefix), m.get_error()
    bitmask = lt.allocate_token_bitmask(BATCH, vocab_size)
    def fill_all():
        for i, m in enumerate(matchers):
            lt.fill_next_token_bitmask(m, bitmask, i)
    out["mask_batch32_serial_ms"] = timed(fill_all, 20)
    out["mask_batch32_walk_ms"] = walk(
        [llguidance.LLMatcher(tok, grammar) for _ in range(BATCH)], token_ids,
        lambda m, i: lt.fill_next_token_bitmask(m, bitmask, i), lambda m, t: m.consume_token(t))
    executor = llguidance.LLExecutor(num_threads=2)
    walkers = [llguidance.LLMatcher(tok, grammar) for _ in range(BATCH)]
    walk_pairs = [(m, i) for i, m in enumerate(walkers)]
    out["mask_batch32_walk_parallel_ms"] = walk(
        walkers, token_ids,
        lambda m, i: lt.fill_next_token_bitmask_par(executor, walk_pairs, bitmask) if i == 0
        else None, lambda m, t: m.consume_token(t))
    pairs = [(m, i) for i, m in enumerate(matchers)]
    out["mask_batch32_batched_ms"] = timed(
        lambda: lt.fill_next_token_bitmask_par(executor, pairs, bitmask), 20)
    logits = torch.randn(BATCH, vocab_size)
    out["apply_mask_batch32_ms"] = timed(
        lambda: lt.apply_token_bitmask_inplace(logits, bitmask), 20)
    out["coverage"] = {}
    for name, (sch, good, bad) in COVERAGE.items():
        g = llguidance.LLMatcher.grammar_from_json_schema(json.dumps(sch))
        ok = llguidance.LLMatcher.validate_grammar(g, tok)
        if ok:  # validate_grammar returns an error string, "" when fine
            out["coverage"][name] = f"compile error: {ok}"[:120]
            continue
        ok_good = _ll_accepts(llguidance.LLMatcher(tok, g), hf, good)
        ok_bad = _ll_accepts(llguidance.LLMatcher(tok, g), hf, bad, need_accepting=True)
        out["coverage"][name] = "ok" if ok_good and not ok_bad else (
            f"accepts valid={ok_good}, accepts invalid={ok_bad}")
    return out


def _ll_accepts(matcher, hf, text: str, need_accepting: bool = False) -> bool:
    ids = hf.encode(text, add_special_tokens=False)
    if not matcher.consume_tokens(ids):
        return False
    return matcher.is_accepting() if need_accepting else not matcher.is_error()


def main() -> None:
    source = open_source(resolve_model_path(sys.argv[1] if len(sys.argv) > 1 else None))
    tokenizer = _load_tokenizer(source)
    hf = tokenizer.hf_tokenizer
    vocab_size = tokenizer.vocab_size
    token_ids = hf.encode(json.dumps(TYPICAL_INSTANCE), add_special_tokens=False)
    result = {"model": source.name, "vocab_size": vocab_size,
              "instance_tokens": len(token_ids), "torch_threads": torch.get_num_threads()}
    for name, fn in (("xgrammar", xgrammar_figures), ("llguidance", llguidance_figures)):
        try:
            result[name] = fn(hf, vocab_size, token_ids)
        except Exception as exc:  # noqa: BLE001 - report what failed
            result[name] = {"error": f"{type(exc).__name__}: {exc}"}
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    main()
