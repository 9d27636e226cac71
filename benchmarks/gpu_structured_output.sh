#!/usr/bin/env bash
# Structured output on one GPU, in one device call: the InternLM2-1.8B shape with random weights
# (`--load-format dummy`, bf16) behind the api_server, loaded by `litedeploy bench serving` at 64
# concurrent requests, unconstrained (--response-format text) vs a JSON schema on every request
# (--response-format json), twice each, alternating. The tokenizer is a real byte-level one
# (SmolLM2's tokenizer.json, which a JSON grammar can spell) padded with special tokens up to the
# model's vocab_size, so the dummy model's logits keep the 1.8B shape.
#   device run (wheels and tokenizer.json in .whl-guided/):  bash benchmarks/gpu_structured_output.sh
#   CPU dry run:  SMALL=1 MODEL=dir-with-config.json PYTHON=.venv/bin/python WHEELS= TOKENIZER=... \
#                 bash benchmarks/gpu_structured_output.sh
set -o pipefail
export PYTHONPATH=. HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
PYTHON=${PYTHON:-python3}
WHEELS=${WHEELS-.whl-guided}
if [ -n "$WHEELS" ] && ls "$WHEELS"/*.whl >/dev/null 2>&1; then
    $PYTHON -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
        --target /tmp/site "$WHEELS"/*.whl && export PYTHONPATH=/tmp/site:.
fi
OUT=${OUT:-benchmarks/results/local}
MODEL=${MODEL:-benchmarks/configs/internlm2-chat-1_8b}
TOKENIZER=${TOKENIZER:-$WHEELS/smollm2-tokenizer.json}
PORT=${PORT:-23392}
mkdir -p "$OUT"
DIR=$(mktemp -d)/model
if [ -n "$SMALL" ]; then
    SERVE=(--num-prompts 8 --max-concurrency 8 --input-len 16 --max-tokens 8)
    ENGINE=(--dtype float32 --device cpu)
else
    SERVE=(--num-prompts 256 --max-concurrency 64 --input-len 128 --max-tokens 128)
    ENGINE=(--dtype bfloat16 --max-batch-size 64)
fi
$PYTHON - "$MODEL" "$TOKENIZER" "$DIR" <<'PY' || exit 1
import json, shutil, sys
from pathlib import Path
from tokenizers import AddedToken, Tokenizer
model, tokenizer_json, out = Path(sys.argv[1]), sys.argv[2], Path(sys.argv[3])
out.mkdir(parents=True)
config = json.loads((model / "config.json").read_text())
shutil.copyfile(model / "config.json", out / "config.json")
tokenizer = Tokenizer.from_file(tokenizer_json)
extra = config["vocab_size"] - tokenizer.get_vocab_size()
tokenizer.add_special_tokens([AddedToken(f"<|pad_{i}|>", special=True) for i in range(extra)])
tokenizer.save(str(out / "tokenizer.json"))
eos = tokenizer.id_to_token(config["eos_token_id"])
(out / "tokenizer_config.json").write_text(json.dumps({
    "tokenizer_class": "PreTrainedTokenizerFast", "eos_token": eos, "add_bos_token": False}))
print(f"tokenizer: {tokenizer.get_vocab_size()} tokens (+{extra} padding), eos {eos!r}")
PY
$PYTHON -m litedeploy serve api_server "$DIR" --load-format dummy "${ENGINE[@]}" \
    --server-port "$PORT" --log-level INFO >"$OUT/structured_server.log" 2>&1 &
SERVER=$!
for _ in $(seq 1 240); do
    curl -sf "http://127.0.0.1:$PORT/health" >/dev/null && break
    kill -0 $SERVER 2>/dev/null || { echo "server exited"; tail -20 "$OUT/structured_server.log"; exit 1; }
    sleep 1
done
for format in text json; do  # warm-up: the grammar vocabulary is built on first use (seconds)
    timeout 60 $PYTHON -m litedeploy bench serving --url "http://127.0.0.1:$PORT" \
        --endpoint completions --vocab-size 49152 --num-prompts 2 --input-len 16 --max-tokens 8 \
        --response-format "$format" >/dev/null
done
for round in 1 2; do
    for format in text json; do
        timeout 120 $PYTHON -m litedeploy bench serving --url "http://127.0.0.1:$PORT" \
            --endpoint completions --vocab-size 49152 "${SERVE[@]}" --response-format "$format" \
            --output-json "$OUT/structured_${format}_${round}.json" >/dev/null
        echo "round $round $format exit $?"
    done
done
kill -TERM $SERVER; wait $SERVER
grep -E "KV cache|captured|ready|serving" "$OUT/structured_server.log" | tail -3
$PYTHON - "$OUT" <<'PY'
import json, sys
out = sys.argv[1]
rate = {}
for round_ in (1, 2):
    for fmt in ("text", "json"):
        try:
            d = json.load(open(f"{out}/structured_{fmt}_{round_}.json"))
        except OSError:
            continue
        rate[fmt, round_] = d["output_throughput_tok_per_s"]
        print(f"round {round_} {fmt:4s}: {d['output_throughput_tok_per_s']} tok/s, "
              f"{d['total_output_tokens']} tokens, errors {d['errors']}, "
              f"tpot p50 {d['tpot_ms'] and d['tpot_ms']['p50']} ms")
for round_ in (1, 2):
    if ("text", round_) in rate and ("json", round_) in rate:
        print(f"round {round_} json/text = {rate['json', round_] / rate['text', round_]:.3f}")
PY
