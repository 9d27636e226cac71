"""Benchmark JSON -> PNG figures (matplotlib, the `bench` extra).

- a latency sweep (`bench sweep`, or one `bench latency`): decode step time and tokens/s against
  batch size, with the bandwidth roofline: the fastest a step can be when it reads the weights
  and the batch's KV cache once at the copy bandwidth measured on the same device;
- a serving run or ladder (`bench serving`): output throughput against concurrency, and the
  TTFT / TPOT distributions (empirical CDFs) of each concurrency.

`python -m litedeploy.bench.plots RESULT.json OUT.png` renders a saved result.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def _pyplot():
    try:
        import matplotlib
    except ImportError:
        raise SystemExit("--plot needs matplotlib: pip install 'litedeploy[bench]'") from None
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def sweep_from_latency(result: dict) -> dict:
    """One `bench latency` result as a one-point sweep."""
    run = result.get("litedeploy", result)
    return {"benchmark": "latency_sweep", "model": result.get("model"),
            "dtype": result.get("dtype"), "input_len": run["input_len"],
            "output_len": run["output_len"], "engine_info": run.get("engine_info", {}),
            "machine": run.get("machine", {}), "copy_bandwidth_tb_s": None, "runs": [run]}


def roofline_step_ms(batch_size: int, sweep: dict) -> float | None:
    """Fastest decode step: weights + the batch's KV cache (at the mean decode context) read once
    at the measured copy bandwidth. None when the bandwidth was not measured."""
    bandwidth = sweep.get("copy_bandwidth_tb_s")
    info = sweep.get("engine_info") or {}
    weights = info.get("weight_bytes_read_per_step")
    if not bandwidth or not weights:
        return None
    kv_per_token = 0.0
    if info.get("kv_cache_tokens"):
        kv_per_token = info["kv_cache_gib"] * 2**30 / info["kv_cache_tokens"]
    context = sweep["input_len"] + sweep["output_len"] / 2
    return (weights + batch_size * context * kv_per_token) / (bandwidth * 1e12) * 1e3


def plot_latency_sweep(sweep: dict, path: str | Path) -> Path:
    plt = _pyplot()
    runs = sorted(sweep["runs"], key=lambda run: run["batch_size"])
    batches = [run["batch_size"] for run in runs]
    step_ms = [run["decode_ms_per_step"] for run in runs]
    tokens_s = [run["decode_tokens_per_s"] for run in runs]
    roof = [roofline_step_ms(b, sweep) for b in batches]
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(batches, step_ms, "o-", label="litedeploy decode step")
    right.plot(batches, tokens_s, "o-", label="litedeploy")
    if all(value is not None for value in roof):
        label = f"roofline ({sweep['copy_bandwidth_tb_s']:.2f} TB/s measured copy bandwidth)"
        left.plot(batches, roof, "--", color="gray", label=label)
        right.plot(batches, [b * 1e3 / ms for b, ms in zip(batches, roof)], "--", color="gray",
                   label=label)
    for axis in (left, right):
        axis.set_xscale("log", base=2)
        axis.set_xticks(batches, [str(b) for b in batches])
        axis.set_xlabel("batch size")
        axis.grid(True, which="both", alpha=0.3)
        axis.legend(fontsize=8)
    left.set_ylabel("ms per decode step")
    right.set_ylabel("decode tokens/s")
    right.set_yscale("log")
    _plain_numbers(right.yaxis)
    fig.suptitle(f"{sweep.get('model')} ({sweep.get('dtype')}) on {_device_name(sweep)}: "
                 f"input {sweep['input_len']}, output {sweep['output_len']} tokens", fontsize=10)
    return _save(fig, plt, path)


def plot_serving(result: dict, path: str | Path) -> Path:
    """A `bench serving` result, or a ladder {"runs": [...]} of them (one per concurrency)."""
    plt = _pyplot()
    runs = sorted(result.get("runs", [result]), key=_concurrency)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(15, 4.2))
    left.plot([_concurrency(r) for r in runs], [r["output_throughput_tok_per_s"] for r in runs],
              "o-")
    left.set_xscale("log", base=2)
    left.set_xticks([_concurrency(r) for r in runs], [str(_concurrency(r)) for r in runs])
    left.set_xlabel("concurrent requests")
    left.set_ylabel("output tokens/s")
    left.set_title("throughput", fontsize=10)
    for axis, key, title in ((middle, "ttft", "time to first token"),
                             (right, "tpot", "time per output token")):
        spans = []
        for run in runs:
            xs, ys = _cdf(run, key)
            axis.plot(xs, ys, drawstyle="steps-post", label=f"{_concurrency(run)} concurrent")
            spans += [x for x in xs if x > 0]
        if spans and max(spans) > 20 * min(spans):  # several decades: a log axis reads better
            axis.set_xscale("log")
            _plain_numbers(axis.xaxis)
        axis.set_xlabel("ms")
        axis.set_ylabel("fraction of requests")
        axis.set_title(title, fontsize=10)
        axis.legend(fontsize=8)
    for axis in (left, middle, right):
        axis.grid(True, which="both", alpha=0.3)
    first = runs[0]
    fig.suptitle(f"bench serving: {first.get('model')}, {first.get('num_prompts')} requests each, "
                 f"max_tokens {first.get('max_tokens')}", fontsize=10)
    return _save(fig, plt, path)


def _plain_numbers(axis) -> None:
    """Log axes labelled 20, 50, 100 rather than 2x10^1 on every minor tick."""
    from matplotlib.ticker import NullFormatter, ScalarFormatter

    axis.set_major_formatter(ScalarFormatter())
    axis.set_minor_formatter(NullFormatter())


def _concurrency(run: dict) -> int:
    return run.get("max_concurrency") or run.get("peak_concurrency") or 1


def _cdf(run: dict, key: str) -> tuple[list[float], list[float]]:
    """The empirical CDF of the raw values, or a step through the percentiles of older results."""
    values = sorted(run.get(f"{key}_ms_all") or [])
    if values:
        return values, [(i + 1) / len(values) for i in range(len(values))]
    summary = run.get(f"{key}_ms") or {}
    points = [(summary[k], q) for k, q in (("p50", 0.5), ("p90", 0.9), ("p99", 0.99),
                                           ("max", 1.0)) if k in summary]
    return [p[0] for p in points], [p[1] for p in points]


def _device_name(sweep: dict) -> str:
    machine = sweep.get("machine") or {}
    return machine.get("gpu") or machine.get("device") or "?"


def _save(fig, plt, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_result(result: dict, path: str | Path) -> Path:
    """Any supported result, by its shape."""
    kind = result.get("benchmark")
    if kind == "latency_sweep":
        return plot_latency_sweep(result, path)
    if kind == "latency" or "litedeploy" in result:
        return plot_latency_sweep(sweep_from_latency(result), path)
    if kind in ("serving", "serving_sweep") or "ttft_ms" in result:
        return plot_serving(result, path)
    raise ValueError(f"no plot for this result (benchmark={kind!r}): use a latency sweep, "
                     "a latency or a serving result")


def main() -> None:
    parser = argparse.ArgumentParser(description="Render a saved benchmark JSON as a PNG.")
    parser.add_argument("result", help="JSON written with --output-json")
    parser.add_argument("output", help="the PNG to write")
    parser.add_argument("--key", default=None,
                        help="plot this part of a suite's merged JSON (dotted, e.g. "
                             "final_one_call.serving)")
    args = parser.parse_args()
    result = json.loads(Path(args.result).read_text())
    for key in args.key.split(".") if args.key else ():
        result = result[key]
    print(plot_result(result, args.output))


if __name__ == "__main__":
    main()
