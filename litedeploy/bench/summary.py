"""One markdown table of the GPU suite's JSON results against the issue's targets.

`python -m litedeploy.bench.summary DIR` reads latency.json, throughput.json and extras.json.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

COPY_BANDWIDTH_TB_S = 3.0  # H100 device-to-device copy, measured on this card kind


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def summary_rows(latency: dict, throughput: dict, extras: dict) -> list[tuple[str, str, str]]:
    rows = []
    ours = latency.get("litedeploy", {})
    if ours:
        bw = ours.get("weight_bandwidth_tb_s", 0.0)
        rows.append(("batch-1 decode (512 in, 256 out)", f"{ours['decode_tokens_per_s']:.0f} tok/s "
                     f"({ours['decode_ms_per_step']:.3f} ms/step, {bw:.2f} TB/s = "
                     f"{100 * bw / COPY_BANDWIDTH_TB_S:.0f}% of copy bandwidth)", ">= 600 tok/s"))
        for key, label in (("transformers", "transformers, dynamic cache"),
                           ("transformers_static_compiled", "transformers, static cache compiled")):
            if key in latency:
                hf = latency[key]
                rows.append((f"batch-1 decode, {label}",
                             f"{hf['decode_tokens_per_s']:.0f} tok/s (ours "
                             f"{ours['decode_tokens_per_s'] / hf['decode_tokens_per_s']:.1f}x)", ""))
    if throughput:
        rows.append(("throughput 1000 x (512 in, 256 out, ratio 0.5)",
                     f"{throughput['output_tokens_per_s']:.0f} out tok/s "
                     f"({throughput['elapsed_s']:.1f} s, {throughput['num_preemptions']} preempt.)",
                     ">= 25,000 out tok/s"))
    if "ttft" in extras:
        rows.append(("TTFT, one 512-token prompt, idle engine",
                     f"{extras['ttft']['ttft_ms_median']:.1f} ms", "< 25 ms"))
    if "prefix_caching" in extras:
        pc = extras["prefix_caching"]
        rows.append(("prefix caching, 256 x (1024 shared + 64) -> 32",
                     f"hit rate {100 * pc['on']['hit_rate']:.0f}%, prompt tokens computed "
                     f"{pc['on']['prompt_tokens_computed']} vs {pc['off']['prompt_tokens_computed']}"
                     f", {pc['on']['elapsed_s']:.2f} s vs {pc['off']['elapsed_s']:.2f} s "
                     f"({pc['speedup']:.1f}x)", "shared part prefilled once"))
    for entry in extras.get("profile", []):
        rows.append((f"decode step profile, batch {entry['batch_size']}, context 512",
                     f"{entry['step_ms']:.3f} ms wall, {entry['gpu_busy_ms_per_step']:.3f} ms GPU",
                     ""))
    info = throughput.get("engine_info") or ours.get("engine_info")
    if info:
        rows.append(("KV cache (throughput engine)",
                     f"{info['kv_cache_tokens']} tokens, {info['kv_cache_gib']:.1f} GiB", ""))
    return rows


def render(rows: list[tuple[str, str, str]], gpu: str) -> str:
    lines = [f"GPU: {gpu}", "", "| measure | reached | target |", "| --- | --- | --- |"]
    lines += [f"| {a} | {b} | {c} |" for a, b, c in rows]
    return "\n".join(lines) + "\n"


def main() -> int:
    folder = Path(sys.argv[1])
    latency, throughput = _load(folder, "latency.json"), _load(folder, "throughput.json")
    extras = _load(folder, "extras.json")
    machine = extras.get("machine") or throughput.get("machine") or {}
    text = render(summary_rows(latency, throughput, extras), machine.get("gpu", "unknown"))
    (folder / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
