"""Benchmarks of the GPU suite beyond throughput/latency: TTFT, prefix caching, a decode profile.

`python -m litedeploy.bench.gpu_extras MODEL --load-format dummy --output-json out.json` builds one
engine (prefix caching available, CUDA graphs on) and runs:
- ttft: one 512-token prompt on an idle engine, add_request -> first token (median of 5);
- prefix: 256 requests sharing a 1,024-token system prompt, prefix caching off then on;
- profile: torch profiler table of one batch-1 decode step and one batch-64 decode step.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from litedeploy.bench.common import engine_info, machine_info, random_prompts, sync, write_json
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine


def run_ttft(engine: LLMEngine, input_len: int = 512, num_iters: int = 5) -> dict:
    prompt = random_prompts(1, input_len, engine.model_config.vocab_size, seed=7)[0]
    engine.generate([prompt], GenerationConfig(max_new_tokens=2, ignore_eos=True))  # warm-up
    times_ms = []
    for i in range(num_iters):
        sync(engine.device)
        start = time.perf_counter()
        engine.add_request(f"ttft{i}", prompt, GenerationConfig(max_new_tokens=1, ignore_eos=True))
        while not any(out.token_ids for out in engine.step()):
            pass
        times_ms.append(1000 * (time.perf_counter() - start))
        while engine.has_unfinished():
            engine.step()
    return {"input_len": input_len, "ttft_ms_median": statistics.median(times_ms),
            "ttft_ms_all": times_ms}


def _prefix_run(engine: LLMEngine, prompts: list[list[int]], output_len: int) -> dict:
    stats = engine.block_manager.stats
    hits0, queries0 = stats.num_prefix_hit_tokens, stats.num_prefix_queries_tokens
    sync(engine.device)
    start = time.perf_counter()
    engine.generate(prompts, GenerationConfig(max_new_tokens=output_len, ignore_eos=True))
    elapsed = time.perf_counter() - start
    hits = stats.num_prefix_hit_tokens - hits0
    queries = stats.num_prefix_queries_tokens - queries0
    total = sum(len(p) for p in prompts)
    return {"elapsed_s": elapsed, "prompt_tokens": total, "prefix_hit_tokens": hits,
            "prompt_tokens_computed": total - hits, "hit_rate": hits / max(queries, 1)}


def run_prefix_caching(engine: LLMEngine, num_requests: int = 256, system_len: int = 1024,
                       user_len: int = 64, output_len: int = 32) -> dict:
    vocab = engine.model_config.vocab_size
    system = random_prompts(1, system_len, vocab, seed=11)[0]
    users = random_prompts(num_requests, user_len, vocab, seed=12)
    prompts = [system + user for user in users]
    engine.block_manager.enable_prefix_caching = False
    off = _prefix_run(engine, prompts, output_len)
    engine.block_manager.enable_prefix_caching = True
    on = _prefix_run(engine, prompts, output_len)
    return {"num_requests": num_requests, "system_len": system_len, "user_len": user_len,
            "output_len": output_len, "off": off, "on": on,
            "time_saved_s": off["elapsed_s"] - on["elapsed_s"],
            "speedup": off["elapsed_s"] / on["elapsed_s"]}


def profile_decode_step(engine: LLMEngine, batch_size: int, context_len: int = 512,
                        num_steps: int = 5) -> dict:
    """Wall time of steady decode steps, then a profiler table of `num_steps` more of them."""
    from torch.profiler import ProfilerActivity, profile

    prompts = random_prompts(batch_size, context_len, engine.model_config.vocab_size, seed=3)
    gen = GenerationConfig(max_new_tokens=64, ignore_eos=True)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"prof{batch_size}-{i}", prompt, gen)
    while engine.scheduler.num_waiting:
        engine.step()
    for _ in range(5):
        engine.step()
    sync(engine.device)
    start = time.perf_counter()
    for _ in range(10):
        engine.step()
    step_ms = 100 * (time.perf_counter() - start)
    activities = [ProfilerActivity.CPU, ProfilerActivity.CUDA]
    with profile(activities=activities) as prof:
        for _ in range(num_steps):
            engine.step()
        sync(engine.device)
    while engine.has_unfinished():
        engine.step()
    table = prof.key_averages().table(sort_by="cuda_time_total", row_limit=18, max_name_column_width=60)
    gpu_us = sum(e.self_device_time_total for e in prof.key_averages()) / num_steps
    return {"batch_size": batch_size, "context_len": context_len, "step_ms": step_ms,
            "gpu_busy_ms_per_step": gpu_us / 1000, "table": table}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    config = EngineConfig(dtype=args.dtype, load_format=args.load_format,
                          max_batch_size=args.max_batch_size, enable_prefix_caching=True)
    engine = LLMEngine.from_pretrained(args.model_path, config)
    result = {"engine_info": engine_info(engine), "machine": machine_info(engine.device)}
    result["ttft"] = run_ttft(engine)
    result["prefix_caching"] = run_prefix_caching(engine)
    if engine.device.type == "cuda":
        result["profile"] = [profile_decode_step(engine, b) for b in (1, 64)]
        for entry in result["profile"]:
            print(f"--- decode step, batch {entry['batch_size']}: {entry['step_ms']:.3f} ms wall, "
                  f"{entry['gpu_busy_ms_per_step']:.3f} ms GPU busy")
            print(entry["table"])
    write_json(result, args.output_json)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
