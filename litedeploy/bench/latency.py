"""Latency of one batch: prefill time, decode time per step, decode tokens/s."""

from __future__ import annotations

import time

from litedeploy.bench.common import engine_info, machine_info, random_prompts, sync
from litedeploy.config import GenerationConfig
from litedeploy.engine.engine import LLMEngine


def run_latency(engine: LLMEngine, batch_size: int, input_len: int, output_len: int,
                num_iters: int = 3) -> dict:
    prompts = random_prompts(batch_size, input_len, engine.model_config.vocab_size)
    gen = GenerationConfig(max_new_tokens=output_len, ignore_eos=True)
    engine.generate(prompts, GenerationConfig(max_new_tokens=4, ignore_eos=True))  # warm-up
    prefill_ms, decode_ms = [], []
    for it in range(num_iters):
        for i, prompt in enumerate(prompts):
            engine.add_request(f"lat{it}-{i}", prompt, gen)
        sync(engine.device)
        start = time.perf_counter()
        # the whole batch's prefill + first tokens: several steps when the batch's prompts
        # exceed --max-prefill-token-num, so decode timing starts once every row decodes
        started: set[str] = set()
        while len(started) < batch_size:
            started.update(out.request_id for out in engine.step() if out.token_ids)
        sync(engine.device)
        prefill_done = time.perf_counter()
        while engine.has_unfinished():
            engine.step()
        # model steps, not engine.step() calls: one engine step may run a multi-step burst
        num_steps = output_len - 1
        sync(engine.device)
        end = time.perf_counter()
        prefill_ms.append(1000 * (prefill_done - start))
        decode_ms.append(1000 * (end - prefill_done) / max(num_steps, 1))
    best_decode = min(decode_ms)
    info = engine_info(engine)
    return {
        "benchmark": "latency", "engine": "litedeploy",
        "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
        "prefill_ms": min(prefill_ms),
        "decode_ms_per_step": best_decode,
        "decode_tokens_per_s": batch_size * 1000 / best_decode,
        # weights (no embedding table) over the step time: the bound that matters at batch 1
        "weight_bandwidth_tb_s": info["weight_bytes_read_per_step"] / best_decode / 1e9,
        "engine_info": info,
        "machine": machine_info(engine.device),
    }
