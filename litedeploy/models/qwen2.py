"""Qwen2: Llama layout plus q/k/v biases (ModelConfig sets qkv_bias for this architecture)."""

from __future__ import annotations

from litedeploy.models.decoder import DecoderForCausalLM


class Qwen2ForCausalLM(DecoderForCausalLM):
    pass
