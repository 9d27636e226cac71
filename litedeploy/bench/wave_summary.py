"""The GPU suite's summary: issue #15's targets against the figures of one run.

`python -m litedeploy.bench.wave_summary DIR` reads what benchmarks/gpu_suite.sh wrote there
(wave.json, wave_off.json, copy_bandwidth.json, profile_*.json, tests.txt) and prints one
markdown table, then the per-kernel profiles.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def _verdict(ok: bool) -> str:
    return "reached" if ok else "missed"


def target_rows(wave: dict, wave_off: dict, copy: dict,
                extra: dict) -> list[tuple[str, str, str, str]]:
    rows = []
    copy_tb_s = copy.get("copy_bandwidth_tb_s")
    b1 = wave.get("latency_b1")
    if b1:
        share = (f", {100 * b1['weight_bandwidth_tb_s'] / copy_tb_s:.0f}% of {copy_tb_s:.2f} TB/s"
                 if copy_tb_s else "")
        off = wave_off.get("latency_b1")
        before = (f"; cuBLAS (GEMV off) {off['decode_tokens_per_s']:.0f} tok/s, "
                  f"{b1['decode_tokens_per_s'] / off['decode_tokens_per_s']:.2f}x") if off else ""
        reached = (f"{b1['decode_tokens_per_s']:.0f} tok/s ({b1['decode_ms_per_step']:.3f} "
                   f"ms/step, {b1['weight_bandwidth_tb_s']:.2f} TB/s{share}){before}")
        rows.append(("batch-1 decode, 512 in / 256 out", reached, ">= 750 tok/s",
                     _verdict(b1["decode_tokens_per_s"] >= 750)))
    b64 = wave.get("latency_b64")
    if b64:
        reached = (f"{b64['decode_tokens_per_s']:.0f} tok/s "
                   f"({b64['decode_ms_per_step']:.3f} ms/step)")
        rows.append(("batch-64 decode, 512 in / 256 out", reached, ">= 24,000 tok/s",
                     _verdict(b64["decode_tokens_per_s"] >= 24000)))
    runs = wave.get("throughput_runs")
    if runs:
        median = wave["throughput_median_out_tok_s"]
        each = ", ".join(f"{r['output_tokens_per_s']:.0f}" for r in runs)
        reached = f"{median:.0f} out tok/s (runs: {each}; {runs[-1]['num_preemptions']} preempt.)"
        rows.append(("offline 1000 x 512/256 (ratio 0.5), median of 3", reached,
                     ">= 32,000 out tok/s",
                     _verdict(median >= 32000)))
    for gemv in ("1", "0"):
        awq = (extra.get(f"latency_awq_gemv{gemv}") or {}).get("litedeploy")
        if awq and b1:
            ratio = awq["decode_tokens_per_s"] / b1["decode_tokens_per_s"]
            reached = (f"{awq['decode_tokens_per_s']:.0f} tok/s ({awq['decode_ms_per_step']:.3f} "
                       f"ms/step) = {ratio:.2f}x bf16")
            how = "int4 GEMV" if gemv == "1" else "awq_gemm (LITEDEPLOY_INT4_GEMV=0)"
            rows.append((f"AWQ int4 batch-1 decode vs bf16, {how}", reached, ">= 1.4x",
                         _verdict(ratio >= 1.4)))
    kv8 = extra.get("throughput_kv8")
    if kv8 and runs:
        ratio = kv8["output_tokens_per_s"] / wave["throughput_median_out_tok_s"]
        reached = (f"{kv8['output_tokens_per_s']:.0f} out tok/s (one run) = {ratio:.2f}x the bf16 "
                   f"median; {kv8['engine_info']['kv_cache_tokens']} KV tokens")
        rows.append(("KV int8 offline throughput vs bf16", reached, ">= 1.0x",
                     _verdict(ratio >= 1.0)))
    longer = wave.get("longer_bursts")
    if longer:
        n = longer["num_scheduler_steps"]
        reached = (f"batch 1 {longer['latency_b1']['decode_tokens_per_s']:.0f}, batch 64 "
                   f"{longer['latency_b64']['decode_tokens_per_s']:.0f} tok/s; throughput "
                   f"{longer['throughput']['output_tokens_per_s']:.0f} out tok/s (one run)")
        rows.append((f"same engine, --num-scheduler-steps {n}", reached, "", ""))
    ttft = wave.get("ttft")
    if ttft:
        off = wave_off.get("ttft")
        before = f"; GEMV off {off['ttft_ms_median']:.2f} ms" if off else ""
        rows.append(("TTFT, one 512-token prompt, idle engine",
                     f"{ttft['ttft_ms_median']:.2f} ms{before}", "< 12 ms",
                     _verdict(ttft["ttft_ms_median"] < 12)))
    return rows


def gemv_lines(gemv: dict) -> list[str]:
    if not gemv:
        return []
    lines = ["", "Linears alone (CUDA graph over weight copies > 2x L2), us and weight GB/s:", "",
             "| linear | N x K | rows | cuBLAS | Triton GEMV |", "| --- | --- | --- | --- | --- |"]
    for entry in gemv["shapes"]:
        for rows, row in entry["rows"].items():
            ours = (f"{row['gemv_us']:.1f} ({row['gemv_gb_s']:.0f})" if "gemv_us" in row
                    else "-")
            lines.append(f"| {entry['name']} | {entry['n']} x {entry['k']} | {rows} | "
                         f"{row['cublas_us']:.1f} ({row['cublas_gb_s']:.0f}) | {ours} |")
    int4 = [e for e in gemv["shapes"] if "int4" in e]
    if int4:
        lines += ["", "| int4, 1 row | GEMV us (int4 GB/s) | awq_gemm us |", "| --- | --- | --- |"]
        lines += [f"| {e['name']} | {e['int4']['gemv_us']:.1f} ({e['int4']['gemv_gb_s']:.0f}) | "
                  f"{e['int4']['awq_gemm_us']:.1f} |" for e in int4]
    return lines


def profile_lines(folder: Path) -> list[str]:
    lines = []
    for path in sorted(folder.glob("profile_*.json")):
        prof = json.loads(path.read_text())
        total = prof["kernel_time_us"]
        variant = "".join([f", KV int{prof['quant_policy']}" if prof.get("quant_policy") else "",
                           f", {prof['model_format']} int4" if prof.get("model_format") else ""])
        title = (f"Decode step kernels, batch {prof['batch_size']}{variant}, GEMV "
                 f"{'on' if prof['gemv'] else 'off'}: {prof['num_kernels']} kernels, "
                 f"{total:.0f} us (ncu, one kernel at a time, caches flushed)")
        lines += ["", title, "", "| group | kernels | us | share |", "| --- | --- | --- | --- |"]
        for group, g in sorted(prof["groups"].items(), key=lambda kv: -kv[1]["us"]):
            lines.append(f"| {group} | {g['count']} | {g['us']:.0f} | "
                         f"{100 * g['us'] / total:.0f}% |")
    return lines


def main() -> int:
    folder = Path(sys.argv[1])
    wave, wave_off = _load(folder, "wave.json"), _load(folder, "wave_off.json")
    copy = _load(folder, "copy_bandwidth.json")
    gpu = (wave.get("machine") or {}).get("gpu", "?")
    lines = [f"GPU: {gpu}", "", "| measure | reached | target | |", "| --- | --- | --- | --- |"]
    names = ("latency_awq_gemv1", "latency_awq_gemv0", "throughput_kv8")
    extra = {name: _load(folder, f"{name}.json") for name in names}
    rows = target_rows(wave, wave_off, copy, extra)
    lines += [f"| {a} | {b} | {c} | {d} |" for a, b, c, d in rows]
    tests = folder / "tests.txt"
    if tests.exists():
        lines += ["", "Tests on the card: " + tests.read_text().strip().splitlines()[-1]]
    lines += gemv_lines(_load(folder, "gemv.json"))
    lines += profile_lines(folder)
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
