"""Everything loaded for one model: weights, tokenizer and stop tokens.

The chat template is the front-ends' (`litedeploy.chat.prompt`): the engine takes token ids.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from litedeploy.config import EngineConfig, ModelConfig
from litedeploy.layers.linear import column_major_float_weights
from litedeploy.loader.model_loader import ModelSource, load_model, open_source, resolve_device
from litedeploy.models.decoder import DecoderForCausalLM
from litedeploy.tokenizer import HF_TOKENIZER_FILES, Tokenizer

logger = logging.getLogger(__name__)


@dataclass
class ModelBundle:
    name: str
    source: ModelSource
    model: DecoderForCausalLM
    model_config: ModelConfig
    tokenizer: Tokenizer | None  # None with --load-format dummy and no tokenizer files
    # eos ids; a front-end's PromptEncoder adds its chat template's end-of-turn tokens
    stop_token_ids: frozenset[int]
    # CUDA memory PyTorch had allocated once the weights were loaded (None on CPU)
    weights_allocated_bytes: int | None = None

    @property
    def device(self) -> torch.device:
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype


def resolve_model_path(model_path: str | None, revision: str | None = None,
                       gguf_file: str | None = None) -> str:
    """A local path: the path itself, a hub id's download (or cache), or the embedded default."""
    if model_path:
        from litedeploy.hub import resolve_model

        return resolve_model(model_path, revision, gguf_file)
    from litedeploy.loader.default_model import default_model_path

    return default_model_path()


def load_bundle(model_path: str | None, config: EngineConfig) -> ModelBundle:
    source = open_source(resolve_model_path(model_path))
    device = resolve_device(config.device)
    on_cuda = device.type == "cuda"
    before = torch.cuda.memory_allocated(device) if on_cuda else 0
    model, model_config = load_model(source, config.dtype, config.device, config.load_format,
                                     config.model_format, config.max_gpu_memory)
    if config.max_batch_size == 1:  # one row per step: the float32 GEMV's faster weight layout
        column_major_float_weights(model)
    weights_allocated = torch.cuda.memory_allocated(device) - before if on_cuda else None
    tokenizer = None
    if config.load_format != "dummy" or _has_tokenizer(source):
        tokenizer = _load_tokenizer(source)
    stop_ids = _stop_token_ids(source, model_config, tokenizer)
    return ModelBundle(source.name, source, model, model_config, tokenizer, stop_ids,
                       weights_allocated)


def _has_tokenizer(source: ModelSource) -> bool:
    """Dummy weights still use a tokenizer that is there (so a server can take text)."""
    if source.is_gguf:
        return True
    folder = Path(source.path)
    return any((folder / name).is_file() for name in HF_TOKENIZER_FILES)


def _load_tokenizer(source: ModelSource) -> Tokenizer:
    if source.is_gguf:
        return Tokenizer.from_hf(source.gguf.load_tokenizer(), source.hf_config)
    return Tokenizer.from_folder(str(source.path), source.hf_config)


def _stop_token_ids(source: ModelSource, model_config: ModelConfig,
                    tokenizer: Tokenizer | None) -> frozenset[int]:
    """Tokenizer eos + generation_config.json eos ids."""
    ids = set(model_config.eos_token_ids)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(tokenizer.eos_token_id)
    gen_config_path = Path(source.path) / "generation_config.json"
    if not source.is_gguf and gen_config_path.exists():
        eos = json.loads(gen_config_path.read_text()).get("eos_token_id")
        ids.update(eos if isinstance(eos, list) else [eos] if eos is not None else [])
    return frozenset(ids)
