"""A step's cost on CPU beside a busy batch: 48 decoding streams, then one 1,830-token prompt
arrives; prints the time to its first token (the mixed step) and the decode steps after it.

    python benchmarks/cpu_mixed_step.py [MAX_PREFILL_TOKEN_NUM]   # the embedded model, 2 threads
"""
import random
import sys
import time

import torch
from litedeploy.config import EngineConfig, GenerationConfig
from litedeploy.engine.engine import LLMEngine
torch.set_num_threads(2)
budget = int(sys.argv[1]) if len(sys.argv) > 1 else 8192
eng = LLMEngine.from_pretrained(None, EngineConfig(max_prefill_token_num=budget))
rng = random.Random(0)
gen = GenerationConfig(max_new_tokens=400, ignore_eos=True)
for i in range(48):
    eng.add_request(f"d{i}", [rng.randrange(100, 40000) for _ in range(40)], gen)
for _ in range(3):
    eng.step()
long_prompt = [rng.randrange(100, 40000) for _ in range(1830)]
eng.add_request("long", long_prompt, GenerationConfig(max_new_tokens=4, ignore_eos=True))
t0 = time.perf_counter(); steps = []
while True:
    s = time.perf_counter(); outs = eng.step(); steps.append(time.perf_counter() - s)
    if any(o.request_id == "long" and o.token_ids for o in outs):
        break
ttft = time.perf_counter() - t0
d = time.perf_counter()
for _ in range(5): eng.step()
print(f"budget={budget} long-prompt TTFT beside 48 streams: {ttft:.2f} s in {len(steps)} steps "
      f"(max step {max(steps):.2f} s); decode step after: {(time.perf_counter()-d)/5*1000:.0f} ms")
