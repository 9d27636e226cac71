"""llama.cpp (through llama-cpp-python) on the same GGUF file and prompt, for side-by-side figures.

A benchmark baseline only: llama-cpp-python is never a dependency of litedeploy; it is imported
when asked for and a missing install ends with one line telling how to get it.

Timing matches `bench latency`: prefill = evaluating the whole prompt and producing the first
token; decode = the time per further greedy token (one `eval` of one token plus the argmax over its
logits), prompt evaluation excluded.
"""

from __future__ import annotations

import os
import time

import numpy as np

from litedeploy.bench.common import random_prompts

INSTALL_HINT = ("llama.cpp baseline needs llama-cpp-python (a benchmark-only extra, built from "
                "source): pip install llama-cpp-python")


def import_llama_cpp():
    try:
        import llama_cpp
    except ImportError as exc:
        raise SystemExit(INSTALL_HINT) from exc
    return llama_cpp


def run_llama_cpp_latency(gguf_path: str, input_len: int, output_len: int, n_threads: int = 2,
                          num_iters: int = 3, vocab_size: int | None = None) -> dict:
    """Batch-1 greedy decode of `random_prompts(1, input_len, vocab)` (the prompt our latency
    benchmark uses) for output_len tokens; best of num_iters, like ours."""
    if not os.path.isfile(gguf_path):
        raise SystemExit(f"llama.cpp baseline needs a GGUF file; got {gguf_path!r}")
    llama_cpp = import_llama_cpp()
    llm = llama_cpp.Llama(model_path=gguf_path, n_threads=n_threads, n_threads_batch=n_threads,
                          n_ctx=input_len + output_len + 16, n_batch=max(512, input_len),
                          verbose=False)
    vocab = vocab_size or llm.n_vocab()
    prompt = random_prompts(1, input_len, vocab)[0]

    def greedy_next() -> int:
        logits = np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(llm.n_vocab(),))
        return int(logits.argmax())

    def timed(num_new: int) -> tuple[float, float]:
        llm.reset()  # n_tokens = 0: eval() drops the cached K/V past it
        start = time.perf_counter()
        llm.eval(prompt)
        token = greedy_next()
        prefill_done = time.perf_counter()
        for _ in range(num_new - 1):
            llm.eval([token])
            token = greedy_next()
        end = time.perf_counter()
        return prefill_done - start, (end - prefill_done) / max(num_new - 1, 1)

    timed(4)  # warm-up
    runs = [timed(output_len) for _ in range(num_iters)]
    prefill_s = min(r[0] for r in runs)
    decode_s = min(r[1] for r in runs)
    info = {
        "benchmark": "latency", "engine": "llama.cpp",
        "llama_cpp_python": getattr(llama_cpp, "__version__", "unknown"),
        "n_threads": n_threads, "gguf": os.path.basename(gguf_path),
        "batch_size": 1, "input_len": input_len, "output_len": output_len,
        "prefill_ms": 1000 * prefill_s,
        "decode_ms_per_step": 1000 * decode_s,
        "decode_tokens_per_s": 1 / decode_s,
        "decode_ms_per_step_all_iters": [1000 * r[1] for r in runs],
    }
    llm.close()
    return info
