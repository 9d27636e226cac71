#!/usr/bin/env bash
# The CPU default path side by side with its peers, on the embedded SmolLM2-135M GGUF, 2 threads:
#   - batch-1 decode and prefill of a 128- and a 512-token prompt: ours with no flags (4-bit
#     weights kept, decode step compiled) and llama.cpp on the same file and prompt, one process
#     after the other (llama-cpp-python, a benchmark-only install: pip install llama-cpp-python);
#   - ours with --eager-mode (what the default was before the compiled step);
#   - float32 (--model-format hf --dtype float32, --max-batch-size 1 as `litedeploy chat` runs it:
#     weights stored transposed) against transformers float32 on the same weights;
#   - serving: an api_server with no flags, `bench serving` with 32 concurrent clients, output tok/s
#     against our batch-1 decode;
#   - time to the first token of `litedeploy chat` from start-up (load + prefill + one token).
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
PORT=${PORT:-23391}
export OMP_NUM_THREADS=$THREADS HF_HUB_OFFLINE=1
mkdir -p "$OUT"
# BENCH_TMP=dir SKIP_ROUNDS=1: redo the serving part and the summary over rounds already in dir
TMP=${BENCH_TMP:-$(mktemp -d)}
# the raw results stay in $TMP if the summary fails (it is removed at the end otherwise)
trap '[ -n "${SERVER:-}" ] && kill "$SERVER" 2>/dev/null || true' EXIT
common=(--batch-size 1 --num-iters 3 --cache-max-tokens 32768)

for round in $(seq 1 "$ROUNDS"); do
    [ -n "${SKIP_ROUNDS:-}" ] && break
    cut -d' ' -f1-3 /proc/loadavg > "$TMP/load-$round.txt"
    for len in 128 512; do  # ours (default path) and llama.cpp, one after the other
        $LD bench latency "${common[@]}" --input-len "$len" --output-len 128 --compare-llama-cpp \
            --llama-cpp-threads "$THREADS" --output-json "$TMP/default-$len-$round.json" > /dev/null
    done
    $LD bench latency "${common[@]}" --input-len 128 --output-len 128 --eager-mode \
        --output-json "$TMP/eager-$round.json" > /dev/null
    $LD bench latency "${common[@]}" --input-len 128 --output-len 64 --model-format hf --max-batch-size 1 \
        --dtype float32 --compare-hf --output-json "$TMP/fp32-$round.json" > /dev/null
    # start-up to the first token of the terminal chat (the compile runs in the background)
    start=$(date +%s.%N)
    echo "Hi" | $LD chat --max-new-tokens 1 > /dev/null 2> "$TMP/chat-$round.txt"
    echo "$(date +%s.%N) - $start" | bc > "$TMP/chat-seconds-$round.txt"
done

# serving: 32 concurrent clients against an api_server with no flags
$LD serve api_server --server-port "$PORT" > "$TMP/server.log" 2>&1 &
SERVER=$!
for _ in $(seq 600); do curl -sf "http://127.0.0.1:$PORT/health" > /dev/null && break; sleep 0.5; done
sleep "${COMPILE_WAIT_S:-150}"  # let the background compile finish (3 graphs, warm cache): the steady state is measured
$LD bench serving --url "http://127.0.0.1:$PORT" --num-prompts 96 --max-concurrency 32 \
    --max-tokens 128 --input-len 128 --endpoint completions --vocab-size 49152 --output-json "$TMP/serving-32.json" > /dev/null
kill "$SERVER"; wait "$SERVER" 2>/dev/null || true; SERVER=

$PY - "$TMP" "$OUT" "$ROUNDS" <<'PY'
import json, statistics, sys
cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo")
            if line.startswith("model name")), "unknown")
tmp, out, rounds = sys.argv[1], sys.argv[2], int(sys.argv[3])
load = lambda name: json.load(open(f"{tmp}/{name}.json"))
runs = []
for r in range(1, rounds + 1):
    d128, d512, eager, fp32 = (load(f"default-128-{r}"), load(f"default-512-{r}"),
                               load(f"eager-{r}"), load(f"fp32-{r}"))
    runs.append({
        "load_avg_1_5_15_before": open(f"{tmp}/load-{r}.txt").read().split(),
        "ours_default_128": d128["litedeploy"], "llama_cpp_128": d128["llama_cpp"],
        "ours_default_512": d512["litedeploy"], "llama_cpp_512": d512["llama_cpp"],
        "ours_eager_128": eager["litedeploy"], "ours_float32_128": fp32["litedeploy"],
        "transformers_float32_128": fp32["transformers"],
        "chat_start_to_first_token_s": float(open(f"{tmp}/chat-seconds-{r}.txt").read()),
    })
med = lambda key, field: statistics.median(run[key][field] for run in runs)
names = ("ours_default_128", "llama_cpp_128", "ours_default_512", "llama_cpp_512",
         "ours_eager_128", "ours_float32_128", "transformers_float32_128")
summary = {name: {field: med(name, field) for field in ("decode_tokens_per_s", "prefill_ms")}
           for name in names}
serving = load("serving-32")
batch1 = summary["ours_default_128"]["decode_tokens_per_s"]
ratios = {
    "decode_default_vs_llama_cpp_128": batch1 / summary["llama_cpp_128"]["decode_tokens_per_s"],
    "decode_default_vs_llama_cpp_512": (summary["ours_default_512"]["decode_tokens_per_s"]
                                        / summary["llama_cpp_512"]["decode_tokens_per_s"]),
    "decode_eager_vs_llama_cpp_128": (summary["ours_eager_128"]["decode_tokens_per_s"]
                                      / summary["llama_cpp_128"]["decode_tokens_per_s"]),
    "prefill_speed_default_vs_llama_cpp_128": (summary["llama_cpp_128"]["prefill_ms"]
                                               / summary["ours_default_128"]["prefill_ms"]),
    "prefill_speed_default_vs_llama_cpp_512": (summary["llama_cpp_512"]["prefill_ms"]
                                               / summary["ours_default_512"]["prefill_ms"]),
    "decode_float32_vs_transformers": (summary["ours_float32_128"]["decode_tokens_per_s"]
                                       / summary["transformers_float32_128"]["decode_tokens_per_s"]),
    "serving_32_clients_vs_batch1": serving["output_throughput_tok_per_s"] / batch1,
}
result = {
    "benchmark": "cpu default path vs llama.cpp / transformers", "model": load("default-128-1")["model"],
    "threads": runs[0]["llama_cpp_128"]["n_threads"],
    "machine": {**runs[0]["ours_default_128"]["machine"], "cpu": cpu},
    "median_of_rounds": summary, "ratios": ratios,
    "chat_start_to_first_token_s": statistics.median(r["chat_start_to_first_token_s"] for r in runs),
    "serving_32_clients": serving, "rounds": runs,
}
json.dump(result, open(f"{out}/cpu-llama-cpp.json", "w"), indent=2)
print(f"CPU: {cpu}, {result['threads']} threads; load before each round:",
      [run["load_avg_1_5_15_before"][0] for run in runs])
print(f"{'run':<28}{'decode tok/s':>14}{'prefill ms':>12}")
for name, s in summary.items():
    print(f"{name:<28}{s['decode_tokens_per_s']:>14.1f}{s['prefill_ms']:>12.1f}")
print(f"{'serving, 32 clients':<28}{serving['output_throughput_tok_per_s']:>14.1f}  (output tok/s)")
for name, value in ratios.items():
    print(f"{name:<44}{value:>6.2f}x")
print(f"chat start-up to first token: {result['chat_start_to_first_token_s']:.1f} s (median)")
PY
rm -rf "$TMP"
