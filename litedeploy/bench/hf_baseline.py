"""Hugging Face transformers on the same weights and shape, for side-by-side comparisons.

The transformers twin is built from our loaded model (q/k/v and gate/up unpacked), so it works for
every source we load: HF folders, GGUF files and --load-format dummy.
"""

from __future__ import annotations

import time

import torch

from litedeploy.bench.common import random_prompts, sync
from litedeploy.models.decoder import DecoderForCausalLM


def hf_twin(model: DecoderForCausalLM, plain_rope: bool = False):
    """plain_rope: default RoPE instead of dynamic NTK, which is the same function up to
    max_position_embeddings but branches on data, which torch.compile(fullgraph) refuses."""
    from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

    cfg = model.config
    params = dict(
        vocab_size=cfg.vocab_size, hidden_size=cfg.hidden_size,
        intermediate_size=cfg.intermediate_size, num_hidden_layers=cfg.num_layers,
        num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads,
        head_dim=cfg.head_dim, max_position_embeddings=cfg.max_position_embeddings,
        rms_norm_eps=cfg.rms_norm_eps, tie_word_embeddings=cfg.tie_word_embeddings,
    )
    rope = {"rope_theta": cfg.rope.theta, "rope_type": cfg.rope.scaling_type or "default"}
    if plain_rope and cfg.rope.scaling_type == "dynamic":
        rope["rope_type"] = "default"
    elif cfg.rope.scaling_type:
        rope["factor"] = cfg.rope.factor
    if cfg.rope.scaling_type == "llama3":
        rope.update(low_freq_factor=cfg.rope.low_freq_factor,
                    high_freq_factor=cfg.rope.high_freq_factor,
                    original_max_position_embeddings=cfg.rope.original_max_position_embeddings)
    if cfg.architecture == "Qwen2ForCausalLM":
        hf_config, cls = Qwen2Config(**params, rope_parameters=rope), Qwen2ForCausalLM
    else:
        hf_config = LlamaConfig(**params, rope_parameters=rope, attention_bias=cfg.qkv_bias)
        cls = LlamaForCausalLM
    dtype = next(model.parameters()).dtype
    device = next(model.parameters()).device
    with torch.device("meta"):
        twin = cls(hf_config)
    twin = twin.to(dtype).to_empty(device=device)
    twin.load_state_dict(_unpacked_state(model), strict=False, assign=False)
    twin.model.rotary_emb = type(twin.model.rotary_emb)(hf_config).to(device)
    if cfg.tie_word_embeddings:
        twin.tie_weights()
    return twin.eval()


def _unpacked_state(model: DecoderForCausalLM) -> dict[str, torch.Tensor]:
    state = {}
    for name, tensor in model.state_dict().items():
        if ".qkv_proj." in name:
            for shard, proj in (("q", "q_proj"), ("k", "k_proj"), ("v", "v_proj")):
                start, end = model.packed_shard_rows(name, shard)
                state[name.replace("qkv_proj", proj)] = tensor[start:end]
        elif ".gate_up_proj." in name:
            for shard, proj in (("gate", "gate_proj"), ("up", "up_proj")):
                start, end = model.packed_shard_rows(name, shard)
                state[name.replace("gate_up_proj", proj)] = tensor[start:end]
        elif not name.startswith("rotary."):
            state[name] = tensor
    return state


class _TokenClock:
    """A generate() streamer that only timestamps: put() runs once for the prompt, then once per
    new token, on the host after the token is known (generate syncs there anyway)."""

    def __init__(self) -> None:
        self.times: list[float] = []

    def put(self, value) -> None:
        self.times.append(time.perf_counter())

    def end(self) -> None:
        pass


@torch.inference_mode()
def run_hf_latency(model: DecoderForCausalLM, batch_size: int, input_len: int, output_len: int,
                   cache_implementation: str | None = None, compile: bool = False,
                   num_iters: int = 1) -> dict:
    """Prefill and per-step decode time from one generate() call with the same lengths every time
    (a static cache sized by another length would recompile)."""
    twin = hf_twin(model, plain_rope=compile)
    device = next(model.parameters()).device
    # compile: a static cache makes generate() compile the decode step itself (transformers'
    # auto-compile; wrapping forward in torch.compile "reduce-overhead" here overwrote outputs)
    twin.generation_config.disable_compile = not compile
    prompts = random_prompts(batch_size, input_len, model.config.vocab_size)
    input_ids = torch.tensor(prompts, device=device)

    def timed(num_new: int) -> tuple[float, float]:
        clock = _TokenClock()
        sync(device)
        start = time.perf_counter()
        twin.generate(input_ids, attention_mask=torch.ones_like(input_ids),
                      max_new_tokens=num_new, min_new_tokens=num_new, do_sample=False,
                      pad_token_id=0, eos_token_id=None, cache_implementation=cache_implementation,
                      streamer=clock if batch_size == 1 else None)
        sync(device)
        end = time.perf_counter()
        if len(clock.times) < 3:  # batched: no streamer; the whole call over the tokens
            return 0.0, (end - start) / num_new
        token_times = clock.times[1:]  # [0] is the prompt
        return token_times[0] - start, (token_times[-1] - token_times[0]) / (len(token_times) - 1)

    timed(output_len if compile else 4)  # warm-up (and compilation, at the measured shape)
    runs = [timed(output_len) for _ in range(num_iters)]
    prefill_s = min(r[0] for r in runs)
    decode_s = min(r[1] for r in runs)
    return {
        "benchmark": "latency", "engine": "transformers",
        "cache_implementation": cache_implementation or "dynamic", "compiled": compile,
        "batch_size": batch_size, "input_len": input_len, "output_len": output_len,
        "prefill_ms": 1000 * prefill_s,
        "decode_ms_per_step": 1000 * decode_s,
        "decode_tokens_per_s": batch_size / decode_s,
    }
