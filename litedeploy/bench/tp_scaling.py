"""Tensor-parallel scaling: latency (batch 1 and 64) and throughput of one engine per (shape, tp).

`python -m litedeploy.bench.tp_scaling run MODEL --tp 2 --tag 1_8b --out DIR` builds one engine
(dummy weights, bfloat16, CUDA graphs, max batch 256) and runs what `bench latency` (batch 1 and
64, 512 in / 256 out) and `bench throughput` (1000 x 512 in / 256 out, range ratio 0.5) run,
writing DIR/{tag}_tp{N}_{latency_b1,latency_b64,throughput}.json; one engine start serves all three.
`python -m litedeploy.bench.tp_scaling summary DIR RESULT_JSON RESULT_MD` merges the folder
(with copy_bandwidth.json from bench.copy_bandwidth) into one JSON and a markdown table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from litedeploy.bench.summary import share_of_copy_bandwidth

KINDS = ("latency_b1", "latency_b64", "throughput")
SHAPES = {"1_8b": "InternLM2-1.8B", "7b": "InternLM2-7B"}


def run(args: argparse.Namespace) -> int:
    import torch

    from litedeploy.bench.common import write_json
    from litedeploy.bench.latency import run_latency
    from litedeploy.bench.throughput import run_throughput
    from litedeploy.config import EngineConfig
    from litedeploy.engine.engine import LLMEngine

    torch.set_grad_enabled(False)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    config = EngineConfig(tp=args.tp, dtype="bfloat16", load_format="dummy",
                          max_batch_size=args.max_batch_size)
    engine = LLMEngine.from_pretrained(args.model_path, config)
    try:
        prefix = out / f"{args.tag}_tp{args.tp}"
        for batch in (1, 64):
            result = run_latency(engine, batch, args.input_len, args.output_len)
            result.update(tp=args.tp, shape=args.tag)
            write_json(result, f"{prefix}_latency_b{batch}.json")
        result = run_throughput(engine, args.num_prompts, args.input_len, args.output_len,
                                args.random_range_ratio)
        result.update(tp=args.tp, shape=args.tag)
        write_json(result, f"{prefix}_throughput.json")
    finally:
        engine.close()
    return 0


def _load(folder: Path, name: str) -> dict | None:
    path = folder / name
    if not path.exists():
        return None
    try:
        return json.loads(path.read_text())
    except ValueError:
        return None


def collect(folder: Path) -> dict:
    """{"copy_bandwidth": ..., "runs": {"1_8b_tp1": {"latency_b1": ..., ...}, ...}}"""
    runs: dict[str, dict] = {}
    for tag in SHAPES:
        for tp in (1, 2):
            entry = {kind: _load(folder, f"{tag}_tp{tp}_{kind}.json") for kind in KINDS}
            if any(entry.values()):
                runs[f"{tag}_tp{tp}"] = entry
    steps = []
    if (folder / "steps.txt").exists():  # "name exit-code seconds" per suite step
        for line in (folder / "steps.txt").read_text().splitlines():
            if len(line.split()) == 3:
                name, rc, secs = line.split()
                steps.append({"name": name, "rc": int(rc), "seconds": int(secs)})
    tests = (folder / "tests.txt").read_text().strip().splitlines()[-1:] if (
        folder / "tests.txt").exists() else []
    return {"copy_bandwidth": _load(folder, "copy_bandwidth.json"), "runs": runs,
            "steps": steps, "tests": tests[0] if tests else None}


def _num(value: float | None, fmt: str = ",.0f") -> str:
    return "n/a" if value is None else format(value, fmt)


def _get(entry: dict, kind: str, key: str) -> float | None:
    result = entry.get(kind)
    return None if result is None else result.get(key)


def render(merged: dict) -> str:
    copy = merged.get("copy_bandwidth")
    lines = ["| shape | tp | batch-1 decode | weights read per GPU | batch-64 decode | "
             "throughput 1000 x (512 in, 256 out) | KV cache tokens |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for key, entry in merged["runs"].items():
        tag, tp = key.rsplit("_tp", 1)
        b1 = entry.get("latency_b1") or {}
        bw = b1.get("weight_bandwidth_tb_s")
        weights = ("n/a" if bw is None else
                   f"{bw:.2f} TB/s {share_of_copy_bandwidth(bw, copy).removeprefix('= ')}")
        b1_text = ("n/a" if not b1 else f"{b1['decode_tokens_per_s']:,.0f} tok/s "
                   f"({b1['decode_ms_per_step']:.3f} ms/step)")
        b64 = entry.get("latency_b64") or {}
        b64_text = ("n/a" if not b64 else f"{b64['decode_tokens_per_s']:,.0f} tok/s "
                    f"({b64['decode_ms_per_step']:.3f} ms/step)")
        tput = entry.get("throughput") or {}
        tput_text = ("n/a" if not tput else f"{tput['output_tokens_per_s']:,.0f} out tok/s "
                     f"({tput['elapsed_s']:.1f} s, {tput['num_preemptions']} preempt.)")
        info = b1.get("engine_info") or tput.get("engine_info") or {}
        lines.append(f"| {SHAPES.get(tag, tag)} | {tp} | {b1_text} | {weights} | {b64_text} | "
                     f"{tput_text} | {_num(info.get('kv_cache_tokens'))} |")
    ratios = _ratios(merged["runs"])
    if ratios:
        lines += ["", "| tp 2 / tp 1 | " + " | ".join(name for name, _ in ratios) + " |",
                  "| --- |" + " --- |" * len(ratios),
                  "| InternLM2-1.8B | " + " | ".join(value for _, value in ratios) + " |"]
    if copy:
        lines += ["", f"Copy bandwidth measured in the same run: {copy['copy_bandwidth_tb_s']:.2f}"
                  f" TB/s ({copy['size_gib']:g} GiB bf16 copy, CUDA events, median of "
                  f"{copy['num_iters']}, bytes read + written) on {copy.get('gpu', '?')}."]
    return "\n".join(lines) + "\n"


def _ratios(runs: dict) -> list[tuple[str, str]]:
    one, two = runs.get("1_8b_tp1"), runs.get("1_8b_tp2")
    if not one or not two:
        return []
    pairs = (("batch-1 decode", "latency_b1", "decode_tokens_per_s"),
             ("batch-64 decode", "latency_b64", "decode_tokens_per_s"),
             ("throughput", "throughput", "output_tokens_per_s"))
    ratios = []
    for name, kind, key in pairs:
        a, b = _get(two, kind, key), _get(one, kind, key)
        ratios.append((name, "n/a" if not a or not b else f"{a / b:.2f}x"))
    return ratios


def summary(args: argparse.Namespace) -> int:
    merged = collect(Path(args.folder))
    text = render(merged)
    Path(args.result_json).parent.mkdir(parents=True, exist_ok=True)
    Path(args.result_json).write_text(json.dumps(merged, indent=2) + "\n")
    Path(args.result_md).write_text(text)
    print(text)
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    runner = sub.add_parser("run")
    runner.add_argument("model_path")
    runner.add_argument("--tp", type=int, default=1)
    runner.add_argument("--tag", required=True, choices=list(SHAPES))
    runner.add_argument("--out", required=True)
    runner.add_argument("--max-batch-size", type=int, default=256)
    runner.add_argument("--input-len", type=int, default=512)
    runner.add_argument("--output-len", type=int, default=256)
    runner.add_argument("--num-prompts", type=int, default=1000)
    runner.add_argument("--random-range-ratio", type=float, default=0.5)
    runner.set_defaults(func=run)
    summ = sub.add_parser("summary")
    summ.add_argument("folder")
    summ.add_argument("result_json")
    summ.add_argument("result_md")
    summ.set_defaults(func=summary)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    raise SystemExit(main())
