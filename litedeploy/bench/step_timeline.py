"""Where the time of an offline-throughput run goes, step by step (a diagnostic, not a score).

`python -m litedeploy.bench.step_timeline MODEL --load-format dummy [--variant NAME ...]` builds
one engine, then runs the throughput workload once per variant (each variant sets a few runtime
knobs of that engine) and prints, per kind of engine step (pure prefill, mixed prefill + decode,
plain decode, multi-step burst), how many there were and their wall time split into: scheduling,
the host's enqueueing of the model step, the GPU's time for it (CUDA events), sampling and the
engine's bookkeeping. `gpu idle` is wall minus GPU time: what a faster host would give back.
Steps taken while nobody waits (the tail, where the batch drains) are counted separately too.
`--profile-mixed N` prints the top kernels of the first N mixed steps (torch.profiler).
The syncs it adds cost a little throughput; the split, not the total, is the point.
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections import defaultdict

import torch

from litedeploy.bench.common import output_lens, random_prompts, sync, write_json
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine import input_builder
from litedeploy.engine.engine import LLMEngine

# runtime knobs of one engine: scheduler token budget / admission interval, burst length, and
# whether decode rows of mixed batches go to the decode kernel
VARIANTS = {
    "default": {},
    "no-multi-step": {"num_scheduler_steps": 1},
    "no-split-mixed": {"split_mixed": False},
    "chunk-any-prompt": {"whole_prompts_after_first": False},
    "prefill-16k": {"max_prefill_token_num": 16384},
    "prefill-16k+chunk-any": {"max_prefill_token_num": 16384, "whole_prompts_after_first": False},
    "prefill-12k": {"max_prefill_token_num": 12288},
    "interval-8": {"prefill_interval": 8},
    "interval-32": {"prefill_interval": 32},
    "steps-16": {"num_scheduler_steps": 16},
}


class _Timeline:
    def __init__(self, engine: LLMEngine, profile_mixed: int = 0):
        self.engine = engine
        self.rows: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
        self.series: list[tuple] = []
        self._current: dict[str, float] = {}
        self._profile_left = profile_mixed
        self._profiled = 0
        self.kernel_table = ""
        self._originals = (engine.scheduler.schedule, engine.runner.run,
                           getattr(engine.runner, "start_burst", None), engine.sampler)
        self._wrap_scheduler()
        self._wrap_runner()
        engine.sampler = _TimedCallable(engine.sampler, self, "sample")

    def restore(self) -> None:
        engine = self.engine
        engine.scheduler.schedule, engine.runner.run, burst, engine.sampler = self._originals
        if burst is not None:
            engine.runner.start_burst = burst

    def _timed_model(self, fn):
        device = self.engine.device

        def wrapper(*args, **kwargs):
            use_events = device.type == "cuda"
            if use_events:
                begin, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(
                    enable_timing=True)
                begin.record()
            start = time.perf_counter()
            result = fn(*args, **kwargs)
            self._current["enqueue"] = time.perf_counter() - start
            if use_events:
                end.record()
            sync(device)
            self._current["model"] = time.perf_counter() - start
            if use_events:
                self._current["gpu"] = begin.elapsed_time(end) / 1000
            return result
        return wrapper

    def _wrap_scheduler(self) -> None:
        scheduler = self.engine.scheduler
        original = scheduler.schedule

        def schedule():
            self._current["tail"] = not scheduler.num_waiting
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
        run = self._timed_model(runner.run)

        def run_maybe_profiled(batch):
            mixed = any(i.num_new_tokens > 1 for i in batch.scheduled) and any(
                i.num_new_tokens == 1 for i in batch.scheduled)
            if not (mixed and self._profile_left > 0):
                return run(batch)
            self._profile_left -= 1
            with torch.profiler.profile(
                    activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                result = run(batch)
            self._profiled += 1
            self.kernel_table = prof.key_averages().table(
                sort_by="cuda_time_total", row_limit=25, max_name_column_width=50)
            return result
        runner.run = run_maybe_profiled
        name = "start_burst" if hasattr(runner, "start_burst") else "run_burst"
        if hasattr(runner, name):
            burst = getattr(runner, name)

            def run_burst(host, num_steps):
                if self.engine.device.type != "cuda":
                    self._current["burst_steps"] = num_steps
                    return self._timed_model(burst)(host, num_steps)
                # no sync: the engine reads the tokens step by step while later steps run; the
                # events are read once the engine step is over
                self._current["burst_steps"] = num_steps
                begin, end = (torch.cuda.Event(enable_timing=True),
                              torch.cuda.Event(enable_timing=True))
                begin.record()
                start = time.perf_counter()
                result = burst(host, num_steps)
                self._current["enqueue"] = time.perf_counter() - start
                end.record()
                self._current["burst_events"] = (begin, end)
                return result
            setattr(runner, name, run_burst)

    def record_step(self, wall: float, t: float) -> None:
        cur, self._current = self._current, {}
        if not cur.get("decode_rows") and not cur.get("prefill_tokens"):
            return
        if "burst_events" in cur:  # the engine step read every token: the burst is over
            begin, end = cur.pop("burst_events")
            end.synchronize()
            cur["gpu"] = begin.elapsed_time(end) / 1000
            cur["model"] = cur["enqueue"]
        if cur.get("burst_steps"):
            kind = "burst"
        elif cur.get("prefill_tokens") and cur.get("decode_rows"):
            kind = "mixed"
        elif cur.get("prefill_tokens"):
            kind = "prefill"
        else:
            kind = "decode"
        keys = ("schedule", "enqueue", "model", "gpu", "sample")
        for name in (kind, "tail" if cur.get("tail") else "not tail", "all"):
            row = self.rows[name]
            row["count"] += 1
            row["model_steps"] += cur.get("burst_steps", 1)
            row["wall_s"] += wall
            row["decode_rows"] += cur.get("decode_rows", 0)
            row["prefill_tokens"] += cur.get("prefill_tokens", 0)
            for key in keys:
                row[f"{key}_s"] += cur.get(key, 0.0)
            row["other_s"] += wall - sum(cur.get(k, 0.0) for k in ("schedule", "model", "sample"))
        self.series.append((round(t, 4), kind, cur.get("burst_steps", 1),
                            cur.get("decode_rows", 0), cur.get("prefill_tokens", 0),
                            round(wall * 1000, 3), round(cur.get("gpu", 0.0) * 1000, 3)))


class _TimedCallable:
    def __init__(self, inner, timeline: _Timeline, key: str):
        self.inner, self.timeline, self.key = inner, timeline, key

    def __call__(self, *args, **kwargs):
        start = time.perf_counter()
        result = self.inner(*args, **kwargs)
        cur = self.timeline._current
        cur[self.key] = cur.get(self.key, 0.0) + time.perf_counter() - start
        return result


def _apply(engine: LLMEngine, options: dict, defaults: dict) -> None:
    options = {**defaults, **options}
    input_builder.SPLIT_MIXED_BATCHES = bool(options["split_mixed"])
    engine.scheduler.whole_prompts_after_first = options["whole_prompts_after_first"]
    engine.scheduler.max_num_batched_tokens = options["max_prefill_token_num"]
    engine.scheduler.prefill_interval = options["prefill_interval"]
    engine.num_scheduler_steps = options["num_scheduler_steps"]


def run_variant(engine: LLMEngine, name: str, args: argparse.Namespace, defaults: dict) -> dict:
    _apply(engine, VARIANTS[name], defaults)
    vocab = engine.model_config.vocab_size
    prompts = random_prompts(args.num_prompts, args.input_len, vocab, args.random_range_ratio)
    lens = output_lens(args.num_prompts, args.output_len, args.random_range_ratio)
    engine.generate(prompts[:1], GenerationConfig(max_new_tokens=4, ignore_eos=True))
    timeline = _Timeline(engine, args.profile_mixed)
    for i, (prompt, n) in enumerate(zip(prompts, lens)):
        engine.add_request(f"s{i}", prompt, GenerationConfig(max_new_tokens=n, ignore_eos=True))
    start = time.perf_counter()
    while engine.has_unfinished():
        step_start = time.perf_counter()
        engine.step()
        timeline.record_step(time.perf_counter() - step_start, step_start - start)
    elapsed = time.perf_counter() - start
    timeline.restore()
    _apply(engine, {}, defaults)
    if timeline.kernel_table:
        print(f"\n## {name}: top kernels of {timeline._profiled} mixed step(s), summed")
        for line in timeline.kernel_table.splitlines():
            print("K|", line)
    return {"variant": name, "elapsed_s": elapsed, "output_tokens": sum(lens),
            "output_tokens_per_s": sum(lens) / elapsed,
            "steps": {kind: dict(row) for kind, row in timeline.rows.items()},
            "series": timeline.series, "plain_out_tok_s": _plain_runs(engine, name, args,
                                                                      defaults)}


def _plain_runs(engine: LLMEngine, name: str, args: argparse.Namespace,
                defaults: dict) -> list[float]:
    """The same workload without the timeline's syncs: the figure the benchmark would report."""
    from litedeploy.bench.throughput import run_throughput

    _apply(engine, VARIANTS[name], defaults)
    runs = [run_throughput(engine, args.num_prompts, args.input_len, args.output_len,
                           args.random_range_ratio, warmup=False)["output_tokens_per_s"]
            for _ in range(args.plain_runs)]
    _apply(engine, {}, defaults)
    return runs


def print_report(result: dict) -> None:
    print(f"\n## {result['variant']}: {result['output_tokens_per_s']:.0f} out tok/s "
          f"({result['elapsed_s']:.2f} s, synced); without syncs: "
          + ", ".join(f"{x:.0f}" for x in result["plain_out_tok_s"])
          + (f" (median {statistics.median(result['plain_out_tok_s']):.0f})"
             if result["plain_out_tok_s"] else ""))
    print("| kind | engine steps | model steps | wall s | ms/model step | schedule | enqueue | "
          "gpu | gpu idle | sample | other | decode rows/step | prefill tok/step |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for kind, row in sorted(result["steps"].items()):
        n, steps = row["count"], max(row["model_steps"], 1)
        print(f"| {kind} | {n:.0f} | {steps:.0f} | {row['wall_s']:.2f} | "
              f"{1000 * row['wall_s'] / steps:.2f} | {row['schedule_s']:.2f} | "
              f"{row['enqueue_s']:.2f} | {row['gpu_s']:.2f} | "
              f"{row['wall_s'] - row['gpu_s']:.2f} | {row['sample_s']:.2f} | "
              f"{row['other_s']:.2f} | {row['decode_rows'] / n:.0f} | "
              f"{row['prefill_tokens'] / n:.0f} |")


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
    parser.add_argument("--profile-mixed", type=int, default=0,
                        help="profile the kernels of this many mixed steps per variant")
    parser.add_argument("--plain-runs", type=int, default=0,
                        help="then this many unsynced throughput runs per variant")
    parser.add_argument("--plain-only", action="append", default=[], choices=list(VARIANTS),
                        help="variants measured by the unsynced runs alone (no timeline)")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    engine = LLMEngine.from_pretrained(args.model_path, EngineConfig(
        dtype=args.dtype, load_format=args.load_format, max_batch_size=args.max_batch_size))
    defaults = {"split_mixed": input_builder.SPLIT_MIXED_BATCHES,
                "whole_prompts_after_first": engine.scheduler.whole_prompts_after_first,
                "max_prefill_token_num": engine.scheduler.max_num_batched_tokens,
                "prefill_interval": engine.scheduler.prefill_interval,
                "num_scheduler_steps": engine.num_scheduler_steps}
    results = []
    for name in args.variant or ["default"]:
        results.append(run_variant(engine, name, args, defaults))
        print_report(results[-1])
    for name in args.plain_only:
        runs = _plain_runs(engine, name, args, defaults)
        results.append({"variant": name, "plain_out_tok_s": runs})
        print(f"\n## {name}: without syncs: " + ", ".join(f"{x:.0f}" for x in runs)
              + f" (median {statistics.median(runs):.0f})")
    engine.close()
    if args.output_json:
        write_json({"timeline": results}, args.output_json)


if __name__ == "__main__":
    main()
