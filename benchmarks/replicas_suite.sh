#!/usr/bin/env bash
# One replica vs two on a 2-GPU host, in one call: two api_servers (one per GPU) on the
# InternLM2-chat-1.8B shape (dummy bf16 weights, generated tokenizer), then `bench serving` at 256
# concurrent clients against the first alone and against both (requests round-robin over the two
# URLs: what `serve ray --replicas 2` does without its prefix router, whose wheel is too large to
# carry to the GPU host). Output tok/s, TTFT p50/p99; a table is printed last.
# $OUT gets replicas-1.json, replicas-2.json, gpu-h200-replicas.json (both) and the server logs.
#   device run (the api_server's wheels in .whl/):  bash benchmarks/replicas_suite.sh
#   CPU dry run:  SMALL=1 MODEL=dir-with-a-tiny-config.json PYTHON=.venv/bin/python WHEELS= \
#                 bash benchmarks/replicas_suite.sh
set -o pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
# no NVLink multicast anywhere: NCCL, PyTorch symmetric memory, NVSHMEM
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # fastapi, uvicorn, pydantic, ...
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:.
fi
OUT=${OUT:-benchmarks/results/local-replicas}
MODEL=${MODEL:-benchmarks/configs/internlm2-chat-1_8b}
PORTS=(23401 23402)
if [ -n "$SMALL" ]; then
    ENGINE=(--load-format dummy --dtype float32 --device cpu --cache-max-tokens 4096)
    SERVE=(--num-prompts 8 --max-concurrency 8 --input-len 16 --max-tokens 8)
    GPUS=("" "")
else
    ENGINE=(--load-format dummy --dtype bfloat16 --max-batch-size 256)
    SERVE=(--num-prompts 768 --max-concurrency 256 --input-len 512 --max-tokens 128)
    GPUS=(0 1)
fi
mkdir -p "$OUT"
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader 2>/dev/null
dir=$(mktemp -d)/model
$PYTHON -m litedeploy.bench.dummy_tokenizer "$MODEL" "$dir" || exit 1
vocab=$($PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
    "$MODEL/config.json")

servers=()
for i in 0 1; do
    CUDA_VISIBLE_DEVICES=${GPUS[$i]} $PYTHON -m litedeploy serve api_server "$dir" "${ENGINE[@]}" \
        --server-port "${PORTS[$i]}" >"$OUT/server-$i.log" 2>&1 &
    servers+=($!)
done
stop() { kill -TERM "${servers[@]}" 2>/dev/null; wait "${servers[@]}"; }
for i in 0 1; do
    for _ in $(seq 240); do
        $PYTHON -c "import httpx,sys; sys.exit(httpx.get(sys.argv[1]).status_code != 200)" \
            "http://127.0.0.1:${PORTS[$i]}/health" 2>/dev/null && break
        kill -0 "${servers[$i]}" 2>/dev/null || { echo "api_server $i exited"; \
            tail -20 "$OUT/server-$i.log"; stop; exit 1; }
        sleep 1
    done
done
grep -hE "api_server:" "$OUT"/server-*.log
one="http://127.0.0.1:${PORTS[0]}"
both="$one,http://127.0.0.1:${PORTS[1]}"
bench() {  # bench NAME URLS
    timeout 150 $PYTHON -m litedeploy bench serving --url "$2" --endpoint completions \
        --vocab-size "$vocab" "${SERVE[@]}" --output-json "$OUT/$1.json" >/dev/null
    echo "$1: exit $?"
}
# warm-up of both servers (first requests of each batch shape), not recorded
timeout 120 $PYTHON -m litedeploy bench serving --url "$both" --endpoint completions \
    --vocab-size "$vocab" --num-prompts 16 --max-concurrency 16 --input-len 64 --max-tokens 16 \
    >/dev/null
bench replicas-1 "$one"
bench replicas-2 "$both"
stop
$PYTHON - "$OUT" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
runs = {n: json.loads((out / f"replicas-{n}.json").read_text()) for n in (1, 2)}
keep = ("url", "num_prompts", "max_concurrency", "input_len", "max_tokens", "completed",
        "errors", "duration_s", "output_throughput_tok_per_s", "request_throughput_per_s",
        "ttft_ms", "tpot_ms", "e2e_latency_ms")
summary = {"benchmark": "replicas", "model": "internlm2-chat-1_8b shape, dummy bf16",
           "runs": {f"{n}_replica": {k: runs[n].get(k) for k in keep} for n in runs}}
(out / "gpu-h200-replicas.json").write_text(json.dumps(summary, indent=2) + "\n")
print("| replicas | output tok/s | TTFT p50 ms | TTFT p99 ms | TPOT p50 ms | errors |")
print("| --- | --- | --- | --- | --- | --- |")
for n, r in runs.items():
    t, p = r["ttft_ms"] or {}, r["tpot_ms"] or {}
    print(f"| {n} | {r['output_throughput_tok_per_s']} | {t.get('p50')} | {t.get('p99')} | "
          f"{p.get('p50')} | {r['errors']} |")
PY
