"""One markdown table of the GPU suite's JSON results against the issue's targets.

`python -m litedeploy.bench.summary DIR` reads latency.json, throughput.json, extras.json and
copy_bandwidth.json (this card's copy bandwidth, measured in the same run by bench.copy_bandwidth).
`python -m litedeploy.bench.summary --quant RAW_DIR OUT_DIR` merges the quantization suite's raw
results (benchmarks/gpu_quant_suite.sh) into OUT_DIR/quant_results.json and quant_summary.md.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path


def _load(folder: Path, name: str) -> dict:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def share_of_copy_bandwidth(bandwidth_tb_s: float, copy: dict | None) -> str:
    """'= 45% of the measured 4.31 TB/s copy bandwidth', or why there is no such figure."""
    measured = (copy or {}).get("copy_bandwidth_tb_s")
    if not measured:
        return "copy bandwidth not measured"
    return (f"= {100 * bandwidth_tb_s / measured:.0f}% of the measured {measured:.2f} TB/s "
            "copy bandwidth")


def summary_rows(latency: dict, throughput: dict, extras: dict,
                 copy: dict | None = None) -> list[tuple[str, str, str]]:
    rows = []
    ours = latency.get("litedeploy", {})
    if ours:
        bw = ours.get("weight_bandwidth_tb_s", 0.0)
        reached = (f"{ours['decode_tokens_per_s']:.0f} tok/s "
                   f"({ours['decode_ms_per_step']:.3f} ms/step, {bw:.2f} TB/s "
                   f"{share_of_copy_bandwidth(bw, copy)})")
        rows.append(("batch-1 decode (512 in, 256 out)", reached, ">= 600 tok/s"))
        for key, label in (("transformers", "transformers, dynamic cache"),
                           ("transformers_static_compiled", "transformers, static cache compiled")):
            if key in latency:
                hf = latency[key]
                speedup = ours["decode_tokens_per_s"] / hf["decode_tokens_per_s"]
                rows.append((f"batch-1 decode, {label}",
                             f"{hf['decode_tokens_per_s']:.0f} tok/s (ours {speedup:.1f}x)", ""))
    if throughput:
        reached = (f"{throughput['output_tokens_per_s']:.0f} out tok/s "
                   f"({throughput['elapsed_s']:.1f} s, {throughput['num_preemptions']} preempt.)")
        rows.append(("throughput 1000 x (512 in, 256 out, ratio 0.5)", reached,
                     ">= 25,000 out tok/s"))
    if "ttft" in extras:
        rows.append(("TTFT, one 512-token prompt, idle engine",
                     f"{extras['ttft']['ttft_ms_median']:.1f} ms", "< 25 ms"))
    if "prefix_caching" in extras:
        pc = extras["prefix_caching"]
        on, off = pc["on"], pc["off"]
        reached = (f"hit rate {100 * on['hit_rate']:.0f}%, prompt tokens computed "
                   f"{on['prompt_tokens_computed']} vs {off['prompt_tokens_computed']}, "
                   f"{on['elapsed_s']:.2f} s vs {off['elapsed_s']:.2f} s ({pc['speedup']:.1f}x)")
        rows.append(("prefix caching, 256 x (1024 shared + 64) -> 32", reached,
                     "shared part prefilled once"))
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


# ---- the quantization suite ----------------------------------------------------------------------
def _gib(value: float | None) -> str:
    if value is None:
        return "n/a"
    return f"{value:.2f} GiB" if value >= 0.1 else f"{value * 1024:.2f} MiB"


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b else "n/a"


def _weights(info: dict) -> str:
    allocated = info.get("weights_allocated_gib")
    extra = f", CUDA allocated after load {_gib(allocated)}" if allocated is not None else ""
    return f"{_gib(info.get('weights_gib'))}{extra}"


def _tput(result: dict) -> str:
    info = result.get("engine_info", {})
    return (f"{result['output_tokens_per_s']:.0f} out tok/s ({result['elapsed_s']:.1f} s, "
            f"KV {info.get('kv_cache_tokens', '?')} tokens, "
            f"{result.get('num_preemptions', 0)} preempt.)")


def _versus(kind: str, value: float, base: dict | None, key: str, base_label: str) -> str:
    return f"{_ratio(value, base[key])} {base_label}" if kind and base else ""


def quant_rows(raw: dict) -> list[tuple[str, str, str]]:
    rows: list[tuple[str, str, str]] = []
    lat = {kind: raw.get(f"latency_{kind}", {}).get("litedeploy") for kind in ("bf16", "awq")}
    tput = {kind: raw.get(f"tput64_{kind}") for kind in ("bf16", "awq")}
    floats = (raw.get("latency_bf16"), tput["bf16"])
    dtype = next((r["dtype"] for r in floats if r and "dtype" in r), "bfloat16")
    dtype = dtype.removeprefix("torch.")
    labels = (("bf16", dtype), ("awq", "AWQ int4"))
    for kind, label in labels:
        if lat[kind]:
            rows.append((f"weights, {label}", _weights(lat[kind]["engine_info"]), ""))
    for kind, label in labels:
        if lat[kind]:
            ours = lat[kind]
            reached = (f"{ours['decode_tokens_per_s']:.0f} tok/s ({ours['decode_ms_per_step']:.3f}"
                       f" ms/step, prefill {ours['prefill_ms']:.1f} ms)")
            note = _versus(kind == "awq", ours["decode_tokens_per_s"], lat["bf16"],
                           "decode_tokens_per_s", dtype)
            what = f"batch-1 decode ({ours['input_len']} in, {ours['output_len']} out), {label}"
            rows.append((what, reached, note))
    for kind, label in labels:
        if tput[kind]:
            result = tput[kind]
            what = (f"throughput, max batch {result['engine_info']['max_batch_size']}, "
                    f"{result['num_prompts']} x ({result['input_len']} in, "
                    f"{result['output_len']} out), {label}")
            note = _versus(kind == "awq", result["output_tokens_per_s"], tput["bf16"],
                           "output_tokens_per_s", dtype)
            rows.append((what, _tput(result), note))
    for policy, label in ((0, f"none ({dtype})"), (8, "int8"), (4, "int4")):
        result = raw.get(f"kv{policy}")
        if result:
            what = (f"throughput, KV {label}, {result['num_prompts']} x ({result['input_len']} "
                    f"in, {result['output_len']} out, ratio {result['random_range_ratio']})")
            note = _versus(policy != 0, result["output_tokens_per_s"], raw.get("kv0"),
                           "output_tokens_per_s", "none")
            rows.append((what, _tput(result), note))
    rows += _serving_rows(raw)
    for step in raw.get("steps", []):
        if step["rc"] == 124 and step["seconds"] == 0:
            rows.append((f"step {step['name']}", "skipped: the time budget was spent", ""))
        elif step["rc"] != 0:
            rows.append((f"step {step['name']}",
                         f"FAILED (exit {step['rc']}, {step['seconds']} s)", "see quant.log"))
    return rows


def _serving_rows(raw: dict) -> list[tuple[str, str, str]]:
    serving, server = raw.get("serving"), raw.get("server", {})
    rows = []
    if serving:
        num = serving["completed"] + serving["errors"]
        ttft = serving.get("ttft_ms") or {}
        what = (f"api_server, {server.get('setup', '?')}: {num} concurrent requests x "
                f"{serving.get('input_len')} prompt tokens, {serving.get('max_tokens')} out")
        reached = (f"{serving['completed']}/{num} ok, {serving['total_prompt_tokens']} prompt "
                   f"tokens, {serving['output_throughput_tok_per_s']} out tok/s, TTFT p50 "
                   f"{ttft.get('p50')} ms / max {ttft.get('max')} ms, {serving['duration_s']} s")
        rows.append((what, reached, "all succeed"))
    metrics = server.get("metrics", {})
    if metrics:
        reserved = metrics.get("gpu_memory_max_reserved_bytes", 0) / 2**30
        allocated = metrics.get("gpu_memory_max_allocated_bytes", 0) / 2**30
        rows.append(("api_server peak, PyTorch allocator (max reserved / max allocated)",
                     f"{_gib(reserved)} / {_gib(allocated)}", "<= the cap"))
    if server.get("smi_peak_mib") is not None:
        peak, idle = server["smi_peak_mib"], server.get("smi_idle_mib") or 0
        reached = (f"{(peak - idle) / 1024:.2f} GiB ({peak} MiB used at peak, {idle} MiB idle; "
                   "the CUDA context and kernel code sit outside the cap)")
        rows.append(("api_server peak, nvidia-smi used (whole GPU, minus idle)", reached, ""))
    if server.get("kv_cache"):
        rows.append(("api_server KV cache", server["kv_cache"], ""))
    if "exit_code" in server:
        rows.append(("api_server after SIGTERM", f"exit {server['exit_code']}", "exit 0"))
    return rows


def _read_lines(path: Path) -> list[str]:
    return path.read_text(errors="replace").splitlines() if path.exists() else []


def collect_quant(raw_dir: Path) -> dict:
    """The suite's raw folder -> one dict: each JSON by its stem, steps, server figures."""
    raw: dict = {}
    for path in sorted(raw_dir.glob("*.json")):
        try:
            raw[path.stem] = json.loads(path.read_text())
        except ValueError:
            raw[path.stem] = {"unreadable": path.read_text(errors="replace")[-500:]}
    raw["steps"] = [{"name": name, "rc": int(rc), "seconds": int(secs)} for name, rc, secs in
                    (line.split() for line in _read_lines(raw_dir / "steps.txt")
                     if len(line.split()) == 3)]
    server: dict = raw.pop("server_info", {})
    metrics = {}
    for line in _read_lines(raw_dir / "server_metrics.txt"):
        match = re.match(r"litedeploy:(gpu_memory_\w+)\{[^}]*\} ([0-9.e+]+)", line)
        if match:
            metrics[match[1]] = float(match[2])
    if metrics:
        server["metrics"] = metrics
    used = [int(v) for v in _read_lines(raw_dir / "smi_used.txt") if v.strip().isdigit()]
    if used:
        server["smi_peak_mib"] = max(used)
    idle = [int(v) for v in _read_lines(raw_dir / "smi_idle.txt") if v.strip().isdigit()]
    if idle:
        server["smi_idle_mib"] = idle[0]
    for line in _read_lines(raw_dir / "server.log"):
        if "litedeploy api_server:" in line and "KV cache" in line:
            server["kv_cache"] = line.split("KV cache", 1)[1].split(";")[0].strip(" ,")
    raw["server"] = server
    return raw


def quant_main(raw_dir: Path, out_dir: Path) -> int:
    raw = collect_quant(raw_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "quant_results.json").write_text(json.dumps(raw, indent=2) + "\n")
    machine = next((r.get("machine") or r.get("litedeploy", {}).get("machine") for r in
                    raw.values() if isinstance(r, dict) and
                    (r.get("machine") or r.get("litedeploy", {}).get("machine"))), {})
    text = render(quant_rows(raw), machine.get("gpu", machine.get("device", "unknown")))
    (out_dir / "quant_summary.md").write_text(text)
    print(text)
    return 0


def main() -> int:
    if sys.argv[1:2] == ["--quant"]:
        return quant_main(Path(sys.argv[2]), Path(sys.argv[3]))
    folder = Path(sys.argv[1])
    latency, throughput = _load(folder, "latency.json"), _load(folder, "throughput.json")
    extras = _load(folder, "extras.json")
    copy = _load(folder, "copy_bandwidth.json")
    machine = extras.get("machine") or throughput.get("machine") or {}
    text = render(summary_rows(latency, throughput, extras, copy), machine.get("gpu", "unknown"))
    (folder / "summary.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
