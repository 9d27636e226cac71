"""Where the time of an offline-throughput run goes, step by step (a diagnostic, not a score).

`python -m litedeploy.bench.step_timeline MODEL --load-format dummy [--variant NAME ...]` runs the
throughput workload once per variant on one engine build each and prints, per kind of engine step
(pure prefill, mixed prefill + decode, plain decode, multi-step burst), how many there were and
their wall time split into: scheduling, the model (device-synchronized, so this is the GPU time
plus launch overhead), sampling and the engine's per-token bookkeeping. The syncs it adds cost a
little throughput; the split, not the total, is the point.
"""

from __future__ import annotations

import argparse
import gc
import time
from collections import defaultdict

import torch

from litedeploy.bench.common import output_lens, random_prompts, sync, write_json
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine import input_builder
from litedeploy.engine.engine import LLMEngine

VARIANTS = {
    "default": {},
    "no-multi-step": {"num_scheduler_steps": 1},
    "split-mixed": {"split_mixed": True},
    "prefill-16k": {"max_prefill_token_num": 16384},
    "split-mixed+prefill-16k": {"split_mixed": True, "max_prefill_token_num": 16384},
}


class _Timeline:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self._current: dict[str, float] = {}
        self._wrap_scheduler()
        self._wrap_runner()
        self._wrap_sampler()

    def _timed(self, key: str, fn):
        device = self.engine.device

        def wrapper(*args, **kwargs):
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            if key == "model":
                sync(device)
            self._current[key] = self._current.get(key, 0.0) + time.perf_counter() - start
            return result
        return wrapper

    def _wrap_scheduler(self) -> None:
        scheduler = self.engine.scheduler
        original = scheduler.schedule

        def schedule():
            start = time.perf_counter()
            batch = original()
            self._current["schedule"] = time.perf_counter() - start
            prefill = sum(i.num_new_tokens for i in batch.scheduled if i.num_new_tokens > 1)
            decode = sum(1 for i in batch.scheduled if i.num_new_tokens == 1)
            self._current["prefill_tokens"] = prefill
            self._current["decode_rows"] = decode
            return batch
        scheduler.schedule = schedule

    def _wrap_runner(self) -> None:
        runner = self.engine.runner
        runner.run = self._timed("model", runner.run)
        if hasattr(runner, "run_burst"):
            burst = runner.run_burst

            def run_burst(host, num_steps):
                self._current["burst_steps"] = num_steps
                return self._timed("model", burst)(host, num_steps)
            runner.run_burst = run_burst

    def _wrap_sampler(self) -> None:
        engine = self.engine
        engine.sampler = _TimedCallable(engine.sampler, self, "sample")

    def record_step(self, wall: float) -> None:
        cur, self._current = self._current, {}
        if not cur.get("decode_rows") and not cur.get("prefill_tokens"):
            return
        if cur.get("burst_steps"):
            kind = "burst"
        elif cur.get("prefill_tokens") and cur.get("decode_rows"):
            kind = "mixed"
        elif cur.get("prefill_tokens"):
            kind = "prefill"
        else:
            kind = "decode"
        row = self.rows[kind]
        row["count"] += 1
        row["model_steps"] += cur.get("burst_steps", 1)
        row["wall_s"] += wall
        row["decode_rows"] += cur.get("decode_rows", 0)
        row["prefill_tokens"] += cur.get("prefill_tokens", 0)
        for key in ("schedule", "model", "sample"):
            row[f"{key}_s"] += cur.get(key, 0.0)
        row["other_s"] += wall - sum(cur.get(k, 0.0) for k in ("schedule", "model", "sample"))


class _TimedCallable:
    def __init__(self, inner, timeline: _Timeline, key: str):
        self.inner, self.timeline, self.key = inner, timeline, key

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.inner(*args, **kwargs)
        cur = self.timeline._current
        cur[self.key] = cur.get(self.key, 0.0) + time.perf_counter() - start
        return result


def run_variant(model: str, name: str, args: argparse.Namespace) -> dict:
    options = dict(VARIANTS[name])
    input_builder.SPLIT_MIXED_BATCHES = bool(options.pop("split_mixed", False))
    config = EngineConfig(dtype=args.dtype, load_format=args.load_format,
                          max_batch_size=args.max_batch_size, **options)
    engine = LLMEngine.from_pretrained(model, config)
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.random_range_ratio)
    lens = output_lens(args.num_prompts, args.output_len, args.random_range_ratio)
    engine.generate(prompts[:1], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    timeline = _Timeline(engine)
    for i, (prompt, n) in enumerate(zip(prompts, lens)):
        engine.add_request(f"s{i}", prompt, GenerationConfig(max_new_tokens=n, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        engine.step()
        timeline.record_step(time.perf_counter() - step_start)
    elapsed = time.perf_counter() - start
    steps = {kind: dict(row) for kind, row in timeline.rows.items()}
    engine.close()
    # the next variant's KV cache is sized from free memory: give this one's back first
    del engine, timeline
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"variant": name, "elapsed_s": elapsed, "output_tokens": sum(lens),
            "output_tokens_per_s": sum(lens) / elapsed,
            "steps": steps}


def print_report(result: dict) -> None:
    print(f"\n## {result['variant']}: {result['output_tokens_per_s']:.0f} out tok/s "
          f"({result['elapsed_s']:.1f} s, synced)")
    print("| kind | engine steps | model steps | wall s | ms/model step | schedule | model | "
          "sample | other | decode rows/step | prefill tok/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, row in sorted(result["steps"].items()):
        n, steps = row["count"], max(row["model_steps"], 1)
        print(f"| {kind} | {n:.0f} | {steps:.0f} | {row['wall_s']:.2f} | "
              f"{1000 * row['wall_s'] / steps:.2f} | {row['schedule_s']:.2f} | "
              f"{row['model_s']:.2f} | {row['sample_s']:.2f} | {row['other_s']:.2f} | "
              f"{row['decode_rows'] / n:.0f} | {row['prefill_tokens'] / n:.0f} |")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--num-prompts", type=int, default=1000)
    parser.add_argument("--input-len", type=int, default=512)
    parser.add_argument("--output-len", type=int, default=256)
    parser.add_argument("--random-range-ratio", type=float, default=0.5)
    parser.add_argument("--variant", action="append", choices=list(VARIANTS))
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    results = []
    for name in args.variant or ["default"]:
        results.append(run_variant(args.model_path, name, args))
        print_report(results[-1])
    if args.output_json:
        write_json({"timeline": results}, args.output_json)


if __name__ == "__main__":
    main()
