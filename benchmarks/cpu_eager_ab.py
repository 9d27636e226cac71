"""The eager CPU step of two source trees side by side (before/after a kernel change).

Run once per tree, alternating, on the same machine; compare the ratios, not the absolute times
(a shared 2-core VM moves them by 2x):

    for i in 1 2; do for tree in /tmp/before .; do
        PYTHONPATH=$tree python benchmarks/cpu_eager_ab.py; done; done

Prints one JSON line: the tree, a hash of the greedy tokens of a mixed batch (equal hashes: the
change moved data only), batch-1 decode ms per step (best of 3 rounds of 60 steps after a
128-token prompt), and the prefill time of one 128-, 512- and 1,024-token prompt (best of 2).
The embedded SmolLM2 GGUF (4-bit kept), `--eager-mode`, 2 threads; `fp32` as the first
argument loads it dequantized to float32 instead.
"""
import hashlib
import json
import random
import sys
import time

import torch

import litedeploy
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine

torch.set_num_threads(2)
options = {"eager_mode": True, "cache_max_tokens": 8192}
if sys.argv[1:] == ["fp32"]:
    options.update(model_format="hf", dtype="float32")
engine = LLMEngine.from_pretrained(None, EngineConfig(**options))
rng = random.Random(0)
prompts = [[rng.randrange(100, 40000) for _ in range(n)] for n in (128, 40, 75)]
outputs = engine.generate(prompts, GenerationConfig(max_new_tokens=24, ignore_eos=True))
tokens = json.dumps([getattr(out, "token_ids", out) for out in outputs], default=str)
result = {"tree": litedeploy.__file__.rsplit("/litedeploy/", 1)[0],
          "tokens": hashlib.sha1(tokens.encode()).hexdigest()[:12]}
best = float("inf")
for round_id in range(3):
    engine.add_request(f"decode{round_id}", prompts[0],
                       GenerationConfig(max_new_tokens=60, ignore_eos=True))
    engine.step()
    engine.step()
    start, steps = time.perf_counter(), 0
    while engine.has_unfinished():
        engine.step()
        steps += 1
    best = min(best, (time.perf_counter() - start) / steps * 1e3)
result["decode_ms"] = round(best, 2)
for prompt_len in (128, 512, 1024):
    best = float("inf")
    for round_id in range(2):
        prompt = [rng.randrange(100, 40000) for _ in range(prompt_len)]
        engine.add_request(f"prefill{prompt_len}-{round_id}", prompt,
                           GenerationConfig(max_new_tokens=1, ignore_eos=True))
        start = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        best = min(best, (time.perf_counter() - start) * 1e3)
    result[f"prefill{prompt_len}_ms"] = round(best, 1)
print(json.dumps(result))
