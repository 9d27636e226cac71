#!/usr/bin/env bash
# Weight and KV cache quantization on one GPU, in one device call (InternLM2-1.8B shape, random
# weights from config.json: `--load-format dummy`, with `--model-format awq` for int4):
#   tests    the dummy-int4 and --max-gpu-memory tests (their CUDA cases run here)
#   a)       bench latency, batch 1, 512 in / 256 out: bf16 vs AWQ int4, with the weights' memory
#   b)       bench throughput, max batch 64, 256 x 512 / 256: bf16 vs AWQ int4
#   serving  api_server with AWQ int4 + KV int8 under --max-gpu-memory 8: 32 concurrent requests
#            of 2,000 prompt tokens; peak memory from its /metrics (PyTorch) and nvidia-smi
#   c)       bench throughput, max batch 256, 1000 x 512 / 256 (ratio 0.5): KV none / int8 / int4
# Every step has a timeout, cut to what is left of BUDGET_S; the table is printed last and
# rewritten after every step (a run cut short still leaves the figures of the steps it finished).
# $OUT gets three files: quant.log, quant_results.json, quant_summary.md.
#   device run (the api_server's wheels in .whl/):  bash benchmarks/gpu_quant_suite.sh
#   CPU dry run:  SMALL=1 MODEL=tiny-model-dir PYTHON=.venv/bin/python WHEELS= bash <this file>
set -o pipefail
START=$(date +%s)
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
SITE=${SITE:-/tmp/site}
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    # fastapi, uvicorn, pydantic, ... for the api_server: wheels only, nothing downloaded
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target "$SITE" "$WHEELS"/*.whl && export PYTHONPATH=$SITE:.
fi
OUT=${OUT:-benchmarks/results/local}
MODEL=${MODEL:-benchmarks/configs/internlm2-chat-1_8b}
BUDGET_S=${BUDGET_S:-550}  # from the start, wheels included: leaves room under a 600 s call
PORT=${PORT:-23391}
RAW=$(mktemp -d)
LOG="$OUT/quant.log"
mkdir -p "$OUT"
echo "PYTHONPATH=$PYTHONPATH" >"$LOG"
if [ -n "$SMALL" ]; then  # the CPU dry run: a tiny model, tiny sizes, no cap (CUDA only)
    DTYPE=float32
    LAT=(--input-len 32 --output-len 16 --num-iters 1)
    T64=(--max-batch-size 8 --num-prompts 16 --input-len 32 --output-len 16)
    KV=(--max-batch-size 16 --num-prompts 32 --input-len 32 --output-len 16)
    SERVE=(--num-prompts 32 --input-len 100 --max-tokens 8)
    CAP_GIB=${CAP_GIB-}
else
    DTYPE=bfloat16
    LAT=(--input-len 512 --output-len 256)
    T64=(--max-batch-size 64 --num-prompts 256 --input-len 512 --output-len 256)
    KV=(--max-batch-size 256 --num-prompts 1000 --input-len 512 --output-len 256)
    SERVE=(--num-prompts 32 --input-len 2000 --max-tokens 128)
    CAP_GIB=${CAP_GIB-8}
fi
COMMON=(--load-format dummy --dtype "$DTYPE" --log-level INFO)
CAP=()
[ -n "$CAP_GIB" ] && CAP=(--max-gpu-memory "$CAP_GIB")
VOCAB=$($PYTHON -c "import json, sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
    "$MODEL/config.json")

summarize() { $PYTHON -m litedeploy.bench.summary --quant "$RAW" "$OUT" >/dev/null 2>&1; }

# step NAME SECONDS COMMAND...: runs COMMAND with a timeout cut to the budget left, logs its exit
# (a shell function gets the seconds as its last argument and keeps to them itself)
step() {
    local name=$1 secs=$2 left t0 rc
    shift 2
    # STEPS="gpu serving": run only the named steps (a re-run of some figures)
    if [ -n "$STEPS" ] && [[ " $STEPS " != *" $name "* ]]; then return 0; fi
    left=$((BUDGET_S - ($(date +%s) - START)))
    ((secs > left)) && secs=$left
    if ((secs < 20)); then
        echo "=== $name: skipped, the time budget is spent" | tee -a "$LOG"
        echo "$name 124 0" >>"$RAW/steps.txt"
        return 124
    fi
    echo "=== $name (timeout ${secs} s)" | tee -a "$LOG"
    t0=$(date +%s)
    if declare -F "$1" >/dev/null; then
        "$@" "$secs" >>"$LOG" 2>&1
    else
        timeout -k 10 "$secs" "$@" >>"$LOG" 2>&1
    fi
    rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >>"$RAW/steps.txt"
    echo "    exit $rc after $(($(date +%s) - t0)) s" | tee -a "$LOG"
    summarize
    return $rc
}

# the capped api_server: a copy of the config folder with a generated tokenizer of the model's
# vocab size (so replies stream as text), token-id prompts of exact length to /v1/completions
serve_capped() {
    local secs=$1 dir=$RAW/model url=http://127.0.0.1:$PORT server smi="" rc exit_code t0 killer
    t0=$(date +%s)
    $PYTHON -m litedeploy.bench.dummy_tokenizer "$MODEL" "$dir" || return 1
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits >"$RAW/smi_idle.txt"
    fi
    $PYTHON -m litedeploy serve api_server "$dir" "${COMMON[@]}" --model-format awq \
        --quant-policy 8 "${CAP[@]}" --server-port "$PORT" >"$RAW/server.log" 2>&1 &
    server=$!
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi -i 0 --query-gpu=memory.used --format=csv,noheader,nounits -lms 250 \
            >"$RAW/smi_used.txt" 2>/dev/null &
        smi=$!
    fi
    $PYTHON - "$url" "$server" $((secs / 2)) <<'EOF'
import os, sys, time
import httpx
url, pid, wait_s = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
deadline = time.monotonic() + wait_s
while time.monotonic() < deadline:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit("the api_server exited before it was ready")
    try:
        if httpx.get(url + "/health", timeout=2).status_code == 200:
            sys.exit(0)
    except httpx.HTTPError:
        pass
    time.sleep(0.5)
sys.exit(f"the api_server was not ready in {wait_s} s")
EOF
    rc=$?
    if ((rc == 0)); then
        timeout $((secs - ($(date +%s) - t0) - 15)) $PYTHON -m litedeploy bench serving \
            --url "$url" --endpoint completions --vocab-size "$VOCAB" --max-concurrency 32 \
            "${SERVE[@]}" --timeout 300 --output-json "$RAW/serving.json"
        rc=$?
        $PYTHON -c "import httpx, sys; sys.stdout.write(httpx.get(sys.argv[1]).text)" \
            "$url/metrics" >"$RAW/server_metrics.txt"
    fi
    kill -TERM "$server" 2>/dev/null  # drains (nothing in flight by now), then exits 0
    (sleep 20 && kill -KILL "$server" 2>/dev/null) &
    killer=$!
    wait "$server"
    exit_code=$?
    kill "$killer" 2>/dev/null
    [ -n "$smi" ] && kill "$smi" 2>/dev/null
    printf '{"setup": "AWQ int4 + KV int8, %s", "exit_code": %d}\n' \
        "${CAP[*]:-no memory cap}" "$exit_code" >"$RAW/server_info.json"
    echo "--- api_server log" && cat "$RAW/server.log"
    ((rc == 0)) && ((exit_code == 0))
}

LD=("$PYTHON" -m litedeploy)
step gpu 20 bash -c "nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader \
    || echo 'no nvidia-smi'; $PYTHON -c 'import torch; print(torch.__version__)'"
step tests 120 "$PYTHON" -m pytest -q -p no:cacheprovider tests/quant/test_dummy_quant.py \
    tests/cli/test_max_gpu_memory.py
for weights in bf16 awq; do
    FORMAT=()
    [ "$weights" = awq ] && FORMAT=(--model-format awq)
    step "latency_$weights" 120 "${LD[@]}" bench latency "$MODEL" "${COMMON[@]}" "${FORMAT[@]}" \
        --batch-size 1 "${LAT[@]}" --output-json "$RAW/latency_$weights.json"
done
for weights in bf16 awq; do
    FORMAT=()
    [ "$weights" = awq ] && FORMAT=(--model-format awq)
    step "tput64_$weights" 120 "${LD[@]}" bench throughput "$MODEL" "${COMMON[@]}" \
        "${FORMAT[@]}" "${T64[@]}" --output-json "$RAW/tput64_$weights.json"
done
step serving 240 serve_capped
for policy in 0 8 4; do
    step "kv$policy" 130 "${LD[@]}" bench throughput "$MODEL" "${COMMON[@]}" \
        --quant-policy "$policy" "${KV[@]}" --random-range-ratio 0.5 \
        --output-json "$RAW/kv$policy.json"
done
echo "=== summary ($(($(date +%s) - START)) s)" | tee -a "$LOG"
"$PYTHON" -m litedeploy.bench.summary --quant "$RAW" "$OUT"
