#!/usr/bin/env bash
# The GPU suite, in one device call (InternLM2-1.8B shape, bf16, dummy weights, CUDA graphs):
#   tests      kernel tests (Triton vs torch twins, the decode GEMV) + CUDA graph / multi-step tests
#   copy       this card's device-to-device copy bandwidth (the roofline of the summary)
#   wave       one engine: batch-1 and batch-64 decode (512 in / 256 out, best of 3), TTFT of a
#              512-token prompt, offline 1000 x 512/256 (ratio 0.5) three times (median)
#              then batch 1, 64 and one throughput run with multi-step bursts of 32 steps
#   wave_off   batch 1 + TTFT again with the Triton GEMV off (LITEDEPLOY_GEMV=0): cuBLAS, before
#   gemv       the GEMV vs cuBLAS at each linear's shape, 1..16 rows (+ a tile sweep)
#   awq        AWQ int4 batch-1 decode (dummy int4 weights), int4 GEMV on / off, against bf16
#   profile    per-kernel time of one decode step (ncu, clocks untouched): batch 1 and 64, KV int8
#              at batch 64, AWQ int4 at batch 1
#   kv8        offline throughput with the KV cache in int8 (one run), against the median
#   summary    the issue's targets against the figures (printed last, summary.md)
# Optional: GEMV_SWEEP=1 sweeps the GEMV's tiles; PROFILES='1:1 1:0' picks the profiles;
# GPU_SUITE_HF=1 adds the transformers baselines (bench latency --compare-hf).
# Results go to $OUT (default benchmarks/results/local).
#   device run:  bash benchmarks/gpu_suite.sh
set -o pipefail
OUT=${OUT:-benchmarks/results/local}
mkdir -p "$OUT"
MODEL=benchmarks/configs/internlm2-chat-1_8b
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
LOG="$OUT/suite.log"
BUDGET_S=${BUDGET_S:-560}  # every step's timeout is cut to what is left, so the summary runs
START=$(date +%s)
step() { echo "=== $* ($(( $(date +%s) - START )) s)" | tee -a "$LOG"; }
left() { local l=$(( BUDGET_S - ($(date +%s) - START) )); (( l < $1 )) && echo $(( l > 5 ? l : 5 )) || echo "$1"; }
COMMON=(--load-format dummy --dtype bfloat16 --log-level INFO)

step "gpu"
nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.mem --format=csv,noheader \
    2>&1 | tee -a "$LOG"
step "tests: kernels + cuda graphs"
timeout "$(left 150)" python3 -m pytest -q -p no:cacheprovider tests/kernels \
    tests/engine/test_cuda_graph.py tests/quant/test_quant_linear.py 2>&1 | tail -15 \
    | tee "$OUT/tests.txt" | tee -a "$LOG"
step "copy bandwidth"
timeout "$(left 40)" python3 -m litedeploy.bench.copy_bandwidth \
    --output-json "$OUT/copy_bandwidth.json" >>"$LOG" 2>&1 || echo "copy bandwidth FAILED" | tee -a "$LOG"
step "wave: batch 1, TTFT, batch 64, throughput x3 (GEMV on)"
timeout "$(left 200)" python3 -m litedeploy.bench.gpu_wave "$MODEL" --output-json "$OUT/wave.json" \
    --extra-burst-steps "${EXTRA_BURST_STEPS:-32}" \
    2>&1 | grep -vE '^ |^\{|^\}' | tee -a "$LOG"
step "wave_off: batch 1 + TTFT with cuBLAS (LITEDEPLOY_GEMV=0)"
LITEDEPLOY_GEMV=0 timeout "$(left 70)" python3 -m litedeploy.bench.gpu_wave "$MODEL" --quick \
    --output-json "$OUT/wave_off.json" 2>&1 | grep -vE '^ |^\{|^\}' | tee -a "$LOG"
for gemv in 1 0; do
    step "AWQ int4 batch 1, int4 GEMV $gemv"
    LITEDEPLOY_INT4_GEMV=$gemv timeout "$(left 60)" python3 -m litedeploy bench latency "$MODEL" \
        "${COMMON[@]}" --model-format awq --max-batch-size 8 --batch-size 1 --input-len 512 \
        --output-len 256 --output-json "$OUT/latency_awq_gemv$gemv.json" >>"$LOG" 2>&1 \
        || echo "awq FAILED" | tee -a "$LOG"
done
step "gemv vs cuBLAS"
timeout "$(left 120)" python3 -m litedeploy.bench.gemv_bench ${GEMV_SWEEP:+--sweep} \
    --output-json "$OUT/gemv.json" 2>&1 | grep -E '^\|' | tee -a "$LOG"
# batch:gemv[:kv quant policy[:model format]]; the KV int8 and AWQ int4 steps profiled too
for spec in ${PROFILES:-1:1 64:1 64:1:8 1:1:0:awq}; do
    IFS=: read -r batch gemv qp fmt <<<"$spec"
    name="b${batch}_gemv${gemv}${qp:+_kv$qp}${fmt:+_$fmt}"
    step "profile: $name"
    LITEDEPLOY_GEMV=$gemv timeout "$(left 100)" python3 -m litedeploy.bench.kernel_profile "$MODEL" \
        --batch-size "$batch" --quant-policy "${qp:-0}" ${fmt:+--model-format "$fmt"} \
        --output-json "$OUT/profile_$name.json" 2>&1 | tail -22 | tee -a "$LOG"
done
step "KV int8 throughput (one run)"
timeout "$(left 90)" python3 -m litedeploy bench throughput "$MODEL" "${COMMON[@]}" --quant-policy 8 \
    --max-batch-size 256 --num-prompts 1000 --input-len 512 --output-len 256 \
    --random-range-ratio 0.5 --output-json "$OUT/throughput_kv8.json" >>"$LOG" 2>&1 \
    || echo "kv int8 FAILED" | tee -a "$LOG"
if [ -n "$GPU_SUITE_HF" ]; then
    step "transformers baselines"
    timeout "$(left 200)" python3 -m litedeploy bench latency "$MODEL" "${COMMON[@]}" \
        --batch-size 1 --input-len 512 --output-len 256 --compare-hf --hf-static-compiled \
        --output-json "$OUT/latency_hf.json" >>"$LOG" 2>&1 || echo "hf FAILED" | tee -a "$LOG"
fi
step "summary"
python3 -m litedeploy.bench.wave_summary "$OUT" | tee "$OUT/summary.md"
