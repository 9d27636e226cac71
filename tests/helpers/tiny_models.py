"""Tiny random checkpoints in the real on-disk formats, with their transformers twins.

Each builder returns (folder, hf_model) where hf_model is the transformers model holding the same
weights (for InternLM2: a LlamaForCausalLM with the de-interleaved weights).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file

from tests.helpers import tokenizers

VOCAB = 300
TINY = dict(
    vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
    num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
    rms_norm_eps=1e-5, bos_token_id=1, eos_token_id=2,
)


def _write_tokenizer(folder: Path, kind: str) -> None:
    if kind == "internlm2":
        tokenizers.write_internlm2_tokenizer(folder)
    else:
        tokenizers.write_bpe_tokenizer(folder, vocab_size=VOCAB)


def make_llama(folder: Path, rope_scaling: dict | None = None, tie: bool = False,
               seed: int = 0, **overrides):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    params = {**TINY, "rope_theta": 10000.0, "tie_word_embeddings": tie, **overrides}
    if rope_scaling:
        params["rope_scaling"] = {**rope_scaling, "rope_theta": params["rope_theta"]}
    model = LlamaForCausalLM(LlamaConfig(**params)).float().eval()
    _randomize_norms(model)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, "bpe")
    return folder, model


def make_qwen2(folder: Path, seed: int = 0, **overrides):
    from transformers import Qwen2Config, Qwen2ForCausalLM

    torch.manual_seed(seed)
    config = Qwen2Config(**{**TINY, **overrides}, rope_theta=10000.0, tie_word_embeddings=True)
    model = Qwen2ForCausalLM(config).float().eval()
    _randomize_norms(model)
    with torch.no_grad():  # random biases, so a dropped bias shows
        for layer in model.model.layers:
            for proj in (layer.self_attn.q_proj, layer.self_attn.k_proj, layer.self_attn.v_proj):
                proj.bias.normal_(0, 0.5)
    model.save_pretrained(folder, safe_serialization=True)
    _write_tokenizer(folder, "bpe")
    return folder, model


def make_internlm2(folder: Path, seed: int = 0, dynamic_factor: float | None = 2.0,
                   max_position_embeddings: int = 256, file_format: str = "safetensors",
                   **overrides):
    """InternLM2 layout (packed interleaved wqkv, its names) from a random Llama twin."""
    llama_folder = folder.parent / (folder.name + "-llama-twin")
    rope = {"rope_type": "dynamic", "factor": dynamic_factor} if dynamic_factor else None
    _, twin = make_llama(llama_folder, rope_scaling=rope, seed=seed,
                         max_position_embeddings=max_position_embeddings, **overrides)
    folder.mkdir(parents=True, exist_ok=True)
    state = _to_internlm2_state(twin)
    config = {
        "architectures": ["InternLM2ForCausalLM"], "model_type": "internlm2",
        "auto_map": {"AutoConfig": "configuration_internlm2.InternLM2Config"},
        "bias": False, "hidden_act": "silu", **TINY, **overrides, "pad_token_id": 2,
        "max_position_embeddings": max_position_embeddings,
        "rope_theta": 10000.0, "tie_word_embeddings": False, "torch_dtype": "float32",
    }
    if dynamic_factor:
        config["rope_scaling"] = {"type": "dynamic", "factor": dynamic_factor}
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    if file_format == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    _write_tokenizer(folder, "internlm2")
    return folder, twin


def _to_internlm2_state(twin) -> dict[str, torch.Tensor]:
    cfg = twin.config
    heads, kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
    head_dim, q_per_kv = cfg.hidden_size // heads, heads // kv_heads
    sd = {k: v.detach().clone().contiguous() for k, v in twin.state_dict().items()}
    out = {
        "model.tok_embeddings.weight": sd["model.embed_tokens.weight"],
        "model.norm.weight": sd["model.norm.weight"],
        "output.weight": sd["lm_head.weight"],
    }
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        q = sd[p + "self_attn.q_proj.weight"].view(kv_heads, q_per_kv, head_dim, -1)
        k = sd[p + "self_attn.k_proj.weight"].view(kv_heads, 1, head_dim, -1)
        v = sd[p + "self_attn.v_proj.weight"].view(kv_heads, 1, head_dim, -1)
        wqkv = torch.cat([q, k, v], dim=1).reshape(-1, cfg.hidden_size).contiguous()
        out[p + "attention.wqkv.weight"] = wqkv
        out[p + "attention.wo.weight"] = sd[p + "self_attn.o_proj.weight"]
        out[p + "attention_norm.weight"] = sd[p + "input_layernorm.weight"]
        out[p + "ffn_norm.weight"] = sd[p + "post_attention_layernorm.weight"]
        out[p + "feed_forward.w1.weight"] = sd[p + "mlp.gate_proj.weight"]
        out[p + "feed_forward.w3.weight"] = sd[p + "mlp.up_proj.weight"]
        out[p + "feed_forward.w2.weight"] = sd[p + "mlp.down_proj.weight"]
        out[p + "attention.rotary_emb.inv_freq"] = torch.zeros(head_dim // 2)  # stale buffer
    return out


def _randomize_norms(model) -> None:
    # norms initialise to ones; random values make a mis-mapped norm weight visible
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
