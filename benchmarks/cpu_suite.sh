#!/usr/bin/env bash
# The CPU benchmarks of the engine issue, side by side in one run, on the embedded SmolLM2-135M
# in float32 (GGUF dequantized: --model-format hf). Writes JSON under benchmarks/results/.
set -euo pipefail
cd "$(dirname "$0")/.."
LD=${LITEDEPLOY:-.venv/bin/litedeploy}
OUT=${OUT_DIR:-benchmarks/results}
mkdir -p "$OUT"
common=(--model-format hf --dtype float32 --cache-max-tokens 32768)

# batch-1 decode: ours and transformers' generate() on the same weights, same prompt length
$LD bench latency "${common[@]}" --batch-size 1 --input-len 128 --output-len 128 \
    --num-iters 3 --compare-hf --output-json "$OUT/cpu-latency-b1.json" > /dev/null
# offline throughput: 32 requests submitted at once
$LD bench throughput "${common[@]}" --num-prompts 32 --input-len 128 --output-len 128 \
    --output-json "$OUT/cpu-throughput-32.json" > /dev/null

python3 - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
lat = json.load(open(f"{out}/cpu-latency-b1.json"))
thr = json.load(open(f"{out}/cpu-throughput-32.json"))
ours_b1 = lat["litedeploy"]["decode_tokens_per_s"]
hf_b1 = lat["transformers"]["decode_tokens_per_s"]
tput = thr["output_tokens_per_s"]
rows = [
    ("litedeploy batch-1 decode tok/s", f"{ours_b1:.1f}"),
    ("transformers batch-1 decode tok/s", f"{hf_b1:.1f}"),
    ("  ratio (target >= 2x)", f"{ours_b1 / hf_b1:.2f}x"),
    ("litedeploy throughput 32x128/128 out tok/s", f"{tput:.1f}"),
    ("  ratio to our batch-1 decode (target >= 4x)", f"{tput / ours_b1:.2f}x"),
    ("TTFT mean / p99 ms (32 at once)", f"{thr['ttft_mean_ms']:.0f} / {thr['ttft_p99_ms']:.0f}"),
    ("TPOT mean / p99 ms", f"{thr['tpot_mean_ms']:.1f} / {thr['tpot_p99_ms']:.1f}"),
]
width = max(len(r[0]) for r in rows)
print("\n".join(f"{a:<{width}}  {b}" for a, b in rows))
PY
