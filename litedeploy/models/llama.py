"""Llama 2/3 and SmolLM2: the checkpoint names are exactly the shared decoder's."""

from __future__ import annotations

from litedeploy.models.decoder import DecoderForCausalLM


class LlamaForCausalLM(DecoderForCausalLM):
    pass
