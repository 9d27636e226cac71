#!/usr/bin/env bash
# The figures of the README, in one GPU call: `bench sweep` (decode latency over batch sizes, with
# the copy bandwidth measured first for the roofline), then `bench serving` over a concurrency
# ladder against an api_server, each JSON plotted next to it. InternLM2-chat-1.8B's config with
# dummy bf16 weights (the speed of the real model; no download).
#   device run (the api_server's wheels in .whl/):  bash benchmarks/plots_suite.sh
set -o pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl}
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then  # fastapi, uvicorn, pydantic, ... (nothing downloaded)
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:.
fi
OUT=${OUT:-benchmarks/results/local}
TAG=${TAG:-gpu}
MODEL=${MODEL:-benchmarks/configs/internlm2-chat-1_8b}
COMMON=(--load-format dummy --dtype "${DTYPE:-bfloat16}")
BATCHES=${BATCHES:-1,2,4,8,16,32,64,128,256}
LADDER=${LADDER:-1,4,16,64,128}
IN=${IN:-512} OUTLEN=${OUTLEN:-128} PROMPTS=${PROMPTS:-128}
PORT=${PORT:-23392}
mkdir -p "$OUT"

echo "=== bench sweep"
timeout 240 $PYTHON -m litedeploy bench sweep "$MODEL" "${COMMON[@]}" --batch-sizes "$BATCHES" \
    --input-len "$IN" --output-len "$OUTLEN" --num-iters 2 --output-json "$OUT/$TAG-sweep.json" \
    --plot "$OUT/$TAG-sweep.png" | tail -3

echo "=== bench serving ladder"
dir=$(mktemp -d)/model
$PYTHON -m litedeploy.bench.dummy_tokenizer "$MODEL" "$dir" || exit 1
vocab=$($PYTHON -c "import json,sys; print(json.load(open(sys.argv[1]))['vocab_size'])" \
    "$MODEL/config.json")
$PYTHON -m litedeploy serve api_server "$dir" "${COMMON[@]}" --server-port "$PORT" \
    --max-batch-size 256 >"$OUT/$TAG-server.log" 2>&1 &
server=$!
for _ in $(seq 120); do
    $PYTHON -c "import httpx,sys; sys.exit(httpx.get(sys.argv[1]).status_code != 200)" \
        "http://127.0.0.1:$PORT/health" 2>/dev/null && break
    kill -0 $server 2>/dev/null || { echo "the api_server exited"; tail -20 "$OUT/$TAG-server.log"; exit 1; }
    sleep 1
done
timeout 300 $PYTHON -m litedeploy bench serving --url "http://127.0.0.1:$PORT" \
    --endpoint completions --input-len "$IN" --vocab-size "$vocab" --max-tokens "$OUTLEN" \
    --num-prompts "$PROMPTS" --concurrency "$LADDER" --output-json "$OUT/$TAG-serving.json" \
    --plot "$OUT/$TAG-serving.png" | grep -E "plot:|output_throughput|max_concurrency\""
kill -TERM $server
wait $server
echo "=== done"
