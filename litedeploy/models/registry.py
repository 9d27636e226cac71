"""Architecture registry: Hugging Face `architectures[0]` -> our model class (no remote code)."""

from __future__ import annotations

from litedeploy.config import SUPPORTED_ARCHITECTURES, ModelConfig
from litedeploy.errors import ModelLoadError
from litedeploy.models.decoder import DecoderForCausalLM
from litedeploy.models.internlm2 import InternLM2ForCausalLM
from litedeploy.models.llama import LlamaForCausalLM
from litedeploy.models.qwen2 import Qwen2ForCausalLM

MODEL_REGISTRY: dict[str, type[DecoderForCausalLM]] = {
    "InternLM2ForCausalLM": InternLM2ForCausalLM,
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
}
assert set(MODEL_REGISTRY) == set(SUPPORTED_ARCHITECTURES)


def model_class_for(config: ModelConfig) -> type[DecoderForCausalLM]:
    try:
        return MODEL_REGISTRY[config.architecture]
    except KeyError:
        raise ModelLoadError(
            f"unsupported architecture {config.architecture!r}; "
            f"supported: {', '.join(MODEL_REGISTRY)}"
        ) from None
