#!/usr/bin/env bash
# Tensor-parallel suite on a 2-GPU host, in one call: the --tp 2 start-up / serve / shut-down
# tests, this card's copy bandwidth, then latency (batch 1 and 64, 512 in / 256 out) and
# throughput (1000 x 512 in / 256 out) at tp 1 and tp 2 on the InternLM2-1.8B shape and tp 2 on
# the InternLM2-7B shape (dummy weights, bfloat16). A table is printed last.
# $OUT gets tp.log, tests.txt, gpu-h200-tp.json (every result) and gpu-h200-tp.md.
#   run:  OUT=... bash benchmarks/tp_suite.sh   (WHL=a folder of wheels for the api_server test:
#         fastapi and its needs, opentelemetry-api included; uvicorn, pydantic, openai)
set -o pipefail
OUT=${OUT:-benchmarks/results/local-tp}
RAW=${RAW:-/tmp/litedeploy-tp-raw}
BUDGET_S=${BUDGET_S:-560}  # the whole suite; each step gets at most what is left
mkdir -p "$OUT" "$RAW"
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# no NVLink multicast anywhere: NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTHON=${PYTHON:-python3}
LOG="$OUT/tp.log"
START=$(date +%s)
: >"$RAW/steps.txt"

# step NAME MAX_SECONDS CMD...: runs CMD under min(MAX, what is left), logs it, records rc
step() {
    local name=$1 max=$2
    shift 2
    local left=$((BUDGET_S - ($(date +%s) - START)))
    local limit=$((max < left ? max : left))
    echo "=== $name (limit ${limit} s, $(($(date +%s) - START)) s in)" | tee -a "$LOG"
    if ((limit < 20)); then
        echo "$name 124 0" >>"$RAW/steps.txt"
        echo "skipped: the time budget is spent" | tee -a "$LOG"
        return
    fi
    local t0
    t0=$(date +%s)
    timeout -k 10 "$limit" "$@" >>"$LOG" 2>&1
    local rc=$?
    echo "$name $rc $(($(date +%s) - t0))" >>"$RAW/steps.txt"
    echo "--- $name: exit $rc in $(($(date +%s) - t0)) s" | tee -a "$LOG"
}

if [[ -n "$WHL" ]]; then  # the api_server test needs fastapi, uvicorn, pydantic, openai
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHL"/*.whl >>"$LOG" 2>&1 && export PYTHONPATH=.:/tmp/site
fi
nvidia-smi --query-gpu=index,name,memory.total,memory.used,driver_version --format=csv,noheader \
    2>&1 | tee -a "$LOG"
$PYTHON -c 'import torch; print("torch", torch.__version__, "devices", torch.cuda.device_count(),
"nccl", torch.cuda.nccl.version())' 2>&1 | tee -a "$LOG"

step tests 180 bash -c "$PYTHON -m pytest -q -p no:cacheprovider -rs \
    tests/distributed/test_tp_lifecycle.py 2>&1 | tee '$OUT/tests.txt'"
step copy_bandwidth 60 $PYTHON -m litedeploy.bench.copy_bandwidth \
    --output-json "$RAW/copy_bandwidth.json"
for run in "1_8b 1 internlm2-chat-1_8b" "1_8b 2 internlm2-chat-1_8b" "7b 2 internlm2-chat-7b"; do
    read -r tag tp folder <<<"$run"
    step "${tag}_tp${tp}" 170 $PYTHON -m litedeploy.bench.tp_scaling run \
        "benchmarks/configs/$folder" --tp "$tp" --tag "$tag" --out "$RAW"
    grep -hE "KV cache budget|KV cache:|captured" "$LOG" | tail -2
done
cp "$OUT/tests.txt" "$RAW/tests.txt" 2>/dev/null
echo "=== summary ($(($(date +%s) - START)) s)" | tee -a "$LOG"
$PYTHON -m litedeploy.bench.tp_scaling summary "$RAW" "$OUT/gpu-h200-tp.json" "$OUT/gpu-h200-tp.md"
tail -3 "$OUT/tests.txt" 2>/dev/null
cat "$RAW/steps.txt"
