#!/usr/bin/env bash
# The GPU suite, in one device call: kernel + CUDA graph tests, bench latency (vs transformers,
# default cache and static cache compiled), bench throughput, TTFT / prefix caching / decode
# profile, then one summary table (printed last). Results go to $OUT (default benchmarks/results/local).
#   device run:  bash benchmarks/gpu_suite.sh
set -o pipefail
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
MODEL=benchmarks/configs/internlm2-chat-1_8b
COMMON=(--load-format dummy --dtype bfloat16 --log-level INFO)
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
LOG="$OUT/suite.log"
step() { echo "=== $*" | tee -a "$LOG"; }

step "gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader 2>&1 | tee -a "$LOG"
step "tests: kernels + cuda graphs"
timeout 120 python3 -m pytest -q -p no:cacheprovider tests/kernels tests/engine/test_cuda_graph.py 2>&1 \
    | tail -15 | tee "$OUT/tests.txt" | tee -a "$LOG"
step "copy bandwidth (the roofline of the summary)"
timeout 60 python3 -m litedeploy.bench.copy_bandwidth --output-json "$OUT/copy_bandwidth.json" \
    >>"$LOG" 2>&1 || echo "copy bandwidth FAILED" | tee -a "$LOG"
step "bench latency"
timeout 200 python3 -m litedeploy bench latency "$MODEL" "${COMMON[@]}" --batch-size 1 --input-len 512 \
    --output-len 256 --compare-hf --hf-static-compiled --output-json "$OUT/latency.json" \
    >>"$LOG" 2>&1 || echo "latency FAILED" | tee -a "$LOG"
step "bench throughput"
timeout 120 python3 -m litedeploy bench throughput "$MODEL" "${COMMON[@]}" --max-batch-size 256 \
    --num-prompts 1000 --input-len 512 --output-len 256 --random-range-ratio 0.5 \
    --output-json "$OUT/throughput.json" >>"$LOG" 2>&1 || echo "throughput FAILED" | tee -a "$LOG"
step "throughput step timeline (where a throughput run's time goes)"
timeout 150 python3 -m litedeploy.bench.step_timeline "$MODEL" --variant default \
    --output-json "$OUT/timeline.json" 2>&1 | grep -E "^\||^##" | tee -a "$LOG"
step "ttft, prefix caching, profile"
timeout 120 python3 -m litedeploy.bench.gpu_extras "$MODEL" --output-json "$OUT/extras.json" >>"$LOG" 2>&1 \
    || echo "extras FAILED" | tee -a "$LOG"
grep -E "KV cache|captured" "$LOG" | tail -4
step "summary"
python3 -m litedeploy.bench.summary "$OUT"
