"""The GPU suite's decode and throughput figures from one engine (CUDA graphs, dummy weights).

`python -m litedeploy.bench.gpu_wave MODEL --output-json out.json [--quick]` loads the model once
(max batch 256, prefix caching off so every TTFT prefill is real) and measures:
- latency at batch 1 and 64 (512 in / 256 out, best of 3, `bench.latency`);
- TTFT of one 512-token prompt on the idle engine (median of 5);
- offline throughput, 1000 x 512 / 256 (ratio 0.5), three runs: the median is the figure (two
  calls of the same run differed by 25% before);
`--quick` keeps batch 1 and TTFT only (the A/B runs of a kernel switch); `--extra-burst-steps N`
then repeats batch 1, batch 64 and one throughput run with multi-step bursts of N steps.
"""

from __future__ import annotations

import argparse
import statistics

import torch

from litedeploy.bench.common import engine_info, machine_info, write_json
from litedeploy.bench.gpu_extras import run_ttft
from litedeploy.bench.latency import run_latency
from litedeploy.bench.throughput import run_throughput
from litedeploy.config import EngineConfig
from litedeploy.engine.engine import LLMEngine


def _strip(run: dict) -> dict:
    return {k: v for k, v in run.items() if k not in ("engine_info", "machine")}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("--load-format", default="dummy")
    parser.add_argument("--dtype", default="bfloat16")
    parser.add_argument("--max-batch-size", type=int, default=256)
    parser.add_argument("--num-throughput-runs", type=int, default=3)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--extra-burst-steps", type=int, default=0,
                        help="then batch 1, 64 and one throughput run with bursts this long")
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    config = EngineConfig(dtype=args.dtype, load_format=args.load_format,
                          max_batch_size=args.max_batch_size)
    engine = LLMEngine.from_pretrained(args.model_path, config)
    result: dict = {"engine_info": engine_info(engine), "machine": machine_info(engine.device)}
    result["latency_b1"] = _strip(run_latency(engine, 1, 512, 256))
    result["ttft"] = run_ttft(engine)
    print(f"batch 1: {result['latency_b1']['decode_tokens_per_s']:.0f} tok/s, "
          f"TTFT {result['ttft']['ttft_ms_median']:.2f} ms", flush=True)
    if not args.quick:
        result["latency_b64"] = _strip(run_latency(engine, 64, 512, 256))
        print(f"batch 64: {result['latency_b64']['decode_tokens_per_s']:.0f} tok/s", flush=True)
        runs = []
        for i in range(args.num_throughput_runs):
            runs.append(_strip(run_throughput(engine, 1000, 512, 256, 0.5, warmup=i == 0)))
            print(f"throughput run {i}: {runs[-1]['output_tokens_per_s']:.0f} out tok/s",
                  flush=True)
        result["throughput_runs"] = runs
        result["throughput_median_out_tok_s"] = statistics.median(
            r["output_tokens_per_s"] for r in runs)
    if args.extra_burst_steps and not args.quick:
        # the same engine with longer multi-step bursts: fewer host syncs per decode step
        engine.num_scheduler_steps = args.extra_burst_steps
        extra = {"num_scheduler_steps": args.extra_burst_steps,
                 "latency_b1": _strip(run_latency(engine, 1, 512, 256)),
                 "latency_b64": _strip(run_latency(engine, 64, 512, 256)),
                 "throughput": _strip(run_throughput(engine, 1000, 512, 256, 0.5, warmup=False))}
        result["longer_bursts"] = extra
        print(f"bursts of {args.extra_burst_steps}: batch 1 "
              f"{extra['latency_b1']['decode_tokens_per_s']:.0f}, batch 64 "
              f"{extra['latency_b64']['decode_tokens_per_s']:.0f} tok/s, throughput "
              f"{extra['throughput']['output_tokens_per_s']:.0f} out tok/s", flush=True)
    write_json(result, args.output_json)
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
