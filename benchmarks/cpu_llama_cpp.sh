#!/usr/bin/env bash
# Batch-1 decode of the embedded SmolLM2-135M GGUF, side by side in one run: ours with the 4-bit
# weights kept (the default, eager), the same with the decode step compiled
# (--cpu-compiled-decode), ours in float32 (--model-format hf), and llama.cpp on the same file and
# prompt (llama-cpp-python, a benchmark-only install: pip install llama-cpp-python).
# ROUNDS rounds (default 3); the summary takes each figure's median. Writes
# $OUT_DIR/cpu-llama-cpp.json (default benchmarks/results). Run it on an otherwise idle machine:
# the load average before each round is recorded next to its figures.
set -euo pipefail
cd "$(dirname "$0")/.."
LD=${LITEDEPLOY:-.venv/bin/litedeploy}
PY=${PYTHON:-.venv/bin/python}
OUT=${OUT_DIR:-benchmarks/results}
ROUNDS=${ROUNDS:-3}
THREADS=${THREADS:-2}
mkdir -p "$OUT"
TMP=$(mktemp -d)
trap 'rm -rf "$TMP"' EXIT
shape=(--batch-size 1 --input-len 128 --output-len 128 --num-iters 3 --cache-max-tokens 32768)

for round in $(seq 1 "$ROUNDS"); do
    cut -d' ' -f1-3 /proc/loadavg > "$TMP/load-$round.txt"
    # ours (4-bit kept, compiled decode) and llama.cpp in one process, one after the other
    OMP_NUM_THREADS=$THREADS $LD bench latency "${shape[@]}" --cpu-compiled-decode \
        --compare-llama-cpp --llama-cpp-threads "$THREADS" \
        --output-json "$TMP/q4c-$round.json" > /dev/null
    OMP_NUM_THREADS=$THREADS $LD bench latency "${shape[@]}" --output-json "$TMP/q4-$round.json" \
        > /dev/null
    OMP_NUM_THREADS=$THREADS $LD bench latency "${shape[@]}" --model-format hf --dtype float32 \
        --output-json "$TMP/fp32-$round.json" > /dev/null
done

$PY - "$TMP" "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), "unknown")
tmp, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
runs = []
for r in range(1, rounds + 1):
    q4 = json.load(open(f"{tmp}/q4-{r}.json"))
    q4c = json.load(open(f"{tmp}/q4c-{r}.json"))
    fp32 = json.load(open(f"{tmp}/fp32-{r}.json"))
    runs.append({
        "load_avg_1_5_15_before": open(f"{tmp}/load-{r}.txt").read().split(),
        "ours_4bit": q4["litedeploy"], "ours_4bit_compiled": q4c["litedeploy"],
        "ours_float32": fp32["litedeploy"], "llama_cpp": q4c["llama_cpp"],
    })
def median(engine, key):
    return statistics.median(run[engine][key] for run in runs)
summary = {
    name: {key: median(name, key) for key in ("decode_tokens_per_s", "decode_ms_per_step",
                                              "prefill_ms")}
    for name in ("ours_4bit", "ours_4bit_compiled", "ours_float32", "llama_cpp")
}
theirs = summary["llama_cpp"]["decode_tokens_per_s"]
ratios = {f"{name}_vs_llama_cpp": summary[name]["decode_tokens_per_s"] / theirs
          for name in ("ours_4bit", "ours_4bit_compiled", "ours_float32")}
result = {
    "benchmark": "cpu batch-1 decode vs llama.cpp", "model": q4["model"],
    "shape": {"batch_size": 1, "input_len": 128, "output_len": 128},
    "threads": runs[0]["llama_cpp"]["n_threads"],
    "machine": {**runs[0]["ours_4bit"]["machine"], "cpu": cpu},
    "median_of_rounds": summary,
    "decode_ratios": ratios,
    "rounds": runs,
}
json.dump(result, open(f"{out}/cpu-llama-cpp.json", "w"), indent=2)
rows = [(name, f"{s['decode_tokens_per_s']:.1f} tok/s", f"{s['decode_ms_per_step']:.2f} ms/tok",
         f"prefill {s['prefill_ms']:.0f} ms") for name, s in summary.items()]
rows += [(f"{name}", f"{value:.2f}x", "(target >= 0.75x)" if "4bit" in name else "", "")
         for name, value in ratios.items()]
print("\n".join("  ".join(f"{c:<22}" for c in row) for row in rows))
print("load before each round:", [run["load_avg_1_5_15_before"][0] for run in runs])
PY
