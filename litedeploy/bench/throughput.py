"""Offline throughput: N requests submitted at once, the engine runs until all finish."""

from __future__ import annotations

import sys
import time

from tqdm.auto import tqdm

from litedeploy.bench.common import (
    engine_info,
    machine_info,
    output_lens,
    percentile,
    random_prompts,
)
from litedeploy.config import GenerationConfig
from litedeploy.engine.engine import LLMEngine


def run_throughput(engine: LLMEngine, num_prompts: int, input_len: int, output_len: int,
                   range_ratio: float = 0.0, warmup: bool = True) -> dict:
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(num_prompts, input_len, vocab, range_ratio)
    out_lens = output_lens(num_prompts, output_len, range_ratio)
    if warmup:
        engine.generate(prompts[:1], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    start = time.perf_counter()
    first_token_at: dict[str, float] = {}
    finished_at: dict[str, float] = {}
    num_out: dict[str, int] = {}
    for i, (prompt, n) in enumerate(zip(prompts, out_lens)):
        engine.add_request(f"t{i}", prompt, GenerationConfig(max_new_tokens=n, ignore_eos=True))
    with tqdm(total=sum(out_lens), desc="Generating", unit="tok", disable=not sys.stderr.isatty(),
              leave=False) as bar:
        while engine.has_unfinished():
            outputs = engine.step()
            now = time.perf_counter() - start
            for out in outputs:
                if out.token_ids and out.request_id not in first_token_at:
                    first_token_at[out.request_id] = now
                num_out[out.request_id] = out.generate_token_len
                bar.update(len(out.token_ids))
                if out.finished:
                    finished_at[out.request_id] = now
    elapsed = time.perf_counter() - start
    total_out = sum(num_out.values())
    total_in = sum(len(p) for p in prompts)
    ttfts = list(first_token_at.values())
    tpots = [(finished_at[r] - first_token_at[r]) / max(num_out[r] - 1, 1)
             for r in finished_at if num_out.get(r, 0) > 1]
    return {
        "benchmark": "throughput",
        "num_prompts": num_prompts, "input_len": input_len, "output_len": output_len,
        "random_range_ratio": range_ratio,
        "elapsed_s": elapsed,
        "requests_per_s": num_prompts / elapsed,
        "output_tokens_per_s": total_out / elapsed,
        "total_tokens_per_s": (total_out + total_in) / elapsed,
        "ttft_mean_ms": 1000 * sum(ttfts) / max(len(ttfts), 1),
        "ttft_p99_ms": 1000 * percentile(ttfts, 99),
        "tpot_mean_ms": 1000 * sum(tpots) / max(len(tpots), 1),
        "tpot_p99_ms": 1000 * percentile(tpots, 99),
        "num_preemptions": engine.num_preemptions,
        "prefix_hit_rate": engine.block_manager.stats.hit_rate,
        "engine_info": engine_info(engine),
        "machine": machine_info(engine.device),
    }
