"""Per-kernel GPU time of one decode step, from Nsight Compute (`ncu`), grouped by kernel.

`python -m litedeploy.bench.kernel_profile MODEL --batch-size 1 --output-json out.json` runs
itself under `ncu --profile-from-start off --clock-control none` (the card's clocks are left as
they are) with one metric, gpu__time_duration.sum, then groups the kernels of one graphed decode
step (context 512, one step per engine step) by name. ncu runs kernels one at a time with the
caches flushed before each, so weights come from HBM (as in a real step, whose 3.4 GB far exceed
the L2) and launch gaps are not counted: the sum is the step's kernel time, to set against its
wall time from the latency benchmark.
"""

from __future__ import annotations

import argparse
import csv
import glob
import io
import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import torch

from litedeploy.bench.common import random_prompts

_GROUPS = (  # (label, regex on the kernel name), first match wins
    ("int4 GEMV / GEMM (Triton)", r"int4|awq"),
    ("gemv (Triton)", r"_gemv_kernel"),
    ("GEMM (cuBLAS / cutlass)", r"gemm|gemv|cutlass|sm90_xmma|nvjet|splitKreduce"),
    ("decode attention (+ split reduce)", r"_decode|attention|_attn|_reduce_splits"),
    ("rms_norm (+ residual)", r"rms_norm"),
    ("rope", r"rope"),
    ("store_kv", r"store_kv"),
    ("silu_and_mul", r"silu"),
    ("argmax / sampler", r"argmax|reduce_kernel|max"),
)


def _ncu() -> str | None:
    found = shutil.which("ncu")
    if found:
        return found
    candidates = sorted(glob.glob("/opt/nvidia/nsight-compute/*/ncu")
                        + glob.glob("/usr/local/cuda*/bin/ncu"))
    return candidates[-1] if candidates else None


def profiled_step(model_path: str, batch_size: int, quant_policy: int = 0,
                  model_format: str | None = None) -> None:
    """The child: one engine, rows decoding at context ~512, one engine step between
    cudaProfilerStart/Stop (multi-step off, so that is exactly one graph replay + sampling)."""
    from litedeploy.config import EngineConfig, GenerationConfig
    from litedeploy.engine.engine import LLMEngine

    config = EngineConfig(dtype="bfloat16", load_format="dummy", max_batch_size=max(8, batch_size),
                          num_scheduler_steps=1, quant_policy=quant_policy,
                          model_format=model_format)
    engine = LLMEngine.from_pretrained(model_path, config)
    prompts = random_prompts(batch_size, 512, engine.model_config.vocab_size, seed=3)
    for i, prompt in enumerate(prompts):
        engine.add_request(f"p{i}", prompt, GenerationConfig(max_new_tokens=16, ignore_eos=True))
    for _ in range(6):
        engine.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.start()
    engine.step()
    torch.cuda.synchronize()
    torch.cuda.profiler.stop()
    while engine.has_unfinished():
        engine.step()


def group_of(name: str) -> str:
    for label, pattern in _GROUPS:
        if re.search(pattern, name, re.IGNORECASE):
            return label
    return "other"


def parse_ncu_csv(text: str) -> list[tuple[str, float]]:
    """[(kernel name, microseconds)] from `ncu --csv --page raw` output."""
    start = text.find('"ID"')
    rows = []
    for row in csv.DictReader(io.StringIO(text[start:])):
        value = row.get("gpu__time_duration.sum", "").replace(",", "")
        try:
            rows.append((row["Kernel Name"], float(value) / 1000))  # ns -> us
        except ValueError:
            continue  # the units row
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("model_path")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--quant-policy", type=int, default=0, help="KV cache: 0, 8 or 4 bits")
    parser.add_argument("--model-format", default=None, help="awq: dummy int4 weights")
    parser.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--output-json", default=None)
    args = parser.parse_args()
    if args.child:
        with torch.inference_mode():
            profiled_step(args.model_path, args.batch_size, args.quant_policy, args.model_format)
        return 0
    ncu = _ncu()
    if ncu is None:
        print("ncu not found", file=sys.stderr)
        return 1
    cmd = [ncu, "--profile-from-start", "off", "--clock-control", "none", "--csv",
           "--page", "raw", "--print-units", "base", "--metrics", "gpu__time_duration.sum",
           sys.executable, "-m", "litedeploy.bench.kernel_profile", args.model_path,
           "--batch-size", str(args.batch_size), "--quant-policy", str(args.quant_policy),
           "--child"]
    if args.model_format:
        cmd += ["--model-format", args.model_format]
    proc = subprocess.run(cmd, check=False, capture_output=True, text=True,
                          env=os.environ.copy())
    kernels = parse_ncu_csv(proc.stdout)
    if not kernels:
        print(proc.stdout[-3000:], proc.stderr[-3000:], sep="\n", file=sys.stderr)
        return 1
    groups: dict[str, list[float]] = {}
    names: dict[str, list[float]] = {}
    for name, us in kernels:
        groups.setdefault(group_of(name), []).append(us)
        names.setdefault(name[:90], []).append(us)
    total = sum(us for _, us in kernels)
    result = {
        "batch_size": args.batch_size, "gemv": os.environ.get("LITEDEPLOY_GEMV", "1") != "0",
        "quant_policy": args.quant_policy, "model_format": args.model_format,
        "num_kernels": len(kernels), "kernel_time_us": total,
        "groups": {g: {"count": len(v), "us": sum(v)} for g, v in groups.items()},
        "kernels": {n: {"count": len(v), "us": sum(v)} for n, v in names.items()},
        "sequence": kernels[:80],
    }
    if args.output_json:
        Path(args.output_json).write_text(json.dumps(result, indent=2) + "\n")
    print(f"\nbatch {args.batch_size}, GEMV {'on' if result['gemv'] else 'off'}: "
          f"{len(kernels)} kernels, {total:.0f} us of kernel time in one step")
    print("| group | kernels | us | share |")
    print("| --- | --- | --- | --- |")
    for g, v in sorted(result["groups"].items(), key=lambda kv: -kv[1]["us"]):
        print(f"| {g} | {v['count']} | {v['us']:.0f} | {100 * v['us'] / total:.0f}% |")
    for n, v in sorted(result["kernels"].items(), key=lambda kv: -kv[1]["us"])[:12]:
        print(f"|   {n} | {v['count']} | {v['us']:.0f} | {100 * v['us'] / total:.0f}% |")
    return 0


if __name__ == "__main__":
    torch.set_grad_enabled(False)
    raise SystemExit(main())
