"""Build a model on the meta device, then stream checkpoint tensors into it at the target dtype."""

from __future__ import annotations

import json
import logging
import sys
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import torch
from tqdm.auto import tqdm

from litedeploy.config import ModelConfig
from litedeploy.distributed.parallel_state import tp_state
from litedeploy.errors import ModelLoadError, ModelNotFoundError
from litedeploy.layers.rotary import RotaryEmbedding
from litedeploy.loader import weights
from litedeploy.loader.quantization import QuantizationPlan, plan_quantization
from litedeploy.models.decoder import DecoderForCausalLM
from litedeploy.models.registry import model_class_for

logger = logging.getLogger(__name__)

_DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


@dataclass
class ModelSource:
    """Where a model comes from: a Hugging Face folder or a GGUF file."""

    path: Path
    hf_config: dict
    is_gguf: bool
    gguf: object | None = field(default=None, repr=False)

    @property
    def name(self) -> str:
        return self.path.stem if self.is_gguf else self.path.name


def open_source(model_path: str | Path) -> ModelSource:
    path = Path(model_path).expanduser()
    if not path.exists():
        raise ModelNotFoundError(f"model path does not exist: {path}")
    if path.is_file():
        if path.suffix != ".gguf":
            raise ModelLoadError(f"{path} is a file but not a .gguf file; pass a model folder")
        from litedeploy.loader.gguf import open_gguf

        checkpoint = open_gguf(str(path))
        return ModelSource(path, checkpoint.hf_config, True, checkpoint)
    config_path = path / "config.json"
    if not config_path.exists():
        raise ModelNotFoundError(f"no config.json in {path}: is this a Hugging Face model folder?")
    try:
        hf_config = json.loads(config_path.read_text())
    except json.JSONDecodeError as exc:
        raise ModelLoadError(f"{config_path} is not valid JSON: {exc}") from exc
    return ModelSource(path, hf_config, False)


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError("--device cuda asked for, but no CUDA device is available")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ModelLoadError(f"unknown device {device!r}: use auto, cuda or cpu")
    return torch.device(device)


def resolve_dtype(dtype: str, config: ModelConfig, device: torch.device) -> torch.dtype:
    if dtype != "auto":
        if dtype not in _DTYPES:
            raise ModelLoadError(f"unknown dtype {dtype!r}: use auto, {', '.join(_DTYPES)}")
        return _DTYPES[dtype]
    if device.type == "cpu":
        return torch.float32
    return torch.float16 if config.checkpoint_dtype == "float16" else torch.bfloat16


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device,
    quantization: QuantizationPlan | None = None,
) -> DecoderForCausalLM:
    with torch.device("meta"):
        model = model_class_for(config)(config)
        if quantization is not None:  # swap linears before any weight memory exists
            quantization.swap_linears(model)
    # cast while still on meta (free), then allocate once at the target dtype
    model = model.to(dtype).to_empty(device=device)
    # rotary inverse frequencies are computed, not loaded: rebuild them on the device in fp32
    model.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    model.rotary.to(device)
    model.tie_weights()
    return model.eval()


def load_model(
    source: ModelSource, dtype: str = "auto", device: str = "auto", load_format: str = "auto",
    model_format: str | None = None,
) -> tuple[DecoderForCausalLM, ModelConfig]:
    plan = plan_quantization(source, model_format)
    tp = tp_state()
    config = ModelConfig.from_hf(plan.hf_config if plan else source.hf_config).shard(tp.world_size)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, config, target_device)
    model = build_model(config, target_dtype, target_device, plan)
    if load_format == "dummy":
        _init_random(model)
    else:
        tensors, total = plan.tensors() if plan else _checkpoint_tensors(source)
        _load_tensors(model, _rank_slices(tensors, model, tp.rank), total)
    if plan is not None:
        plan.finalize(model)
    return model, config


def _rank_slices(tensors: Iterator[tuple[str, torch.Tensor]], model: DecoderForCausalLM,
                 rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Under tensor parallelism keep only this rank's slice of each sharded tensor."""
    for name, tensor in tensors:
        piece = model.tp_slice(name, rank)
        yield name, tensor if piece is None else tensor.narrow(*piece)


def _checkpoint_tensors(source: ModelSource) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
    if source.is_gguf:
        return source.gguf.tensors(), len(source.gguf.tensor_names())
    files = weights.find_weight_files(source.path)
    return weights.iter_tensors(files), weights.count_tensors(files)


def _init_random(model: DecoderForCausalLM) -> None:
    generator = torch.Generator(device="cpu").manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("layernorm.weight") or name.endswith("norm.weight"):
                param.fill_(1.0)
            else:
                values = torch.randn(param.shape, generator=generator) * 0.02
                param.copy_(values)


def _load_tensors(
    model: DecoderForCausalLM, tensors: Iterator[tuple[str, torch.Tensor]], total: int | None
) -> None:
    params = dict(model.named_parameters())
    rows_loaded: dict[str, int] = {name: 0 for name in params}
    show_bar = sys.stderr.isatty()
    with torch.no_grad():
        for name, tensor in tqdm(tensors, total=total, desc="Loading weights", unit="tensor",
                                 disable=not show_bar, leave=False):
            for param_name, shard, part in model.map_weight(name, tensor):
                if param_name not in params:
                    raise ModelLoadError(f"unexpected tensor {name} (no parameter {param_name})")
                param = params[param_name]
                target = param
                if shard is not None:
                    start, end = model.packed_shard_rows(param_name, shard)
                    target = param[start:end]
                if tuple(part.shape) != tuple(target.shape):
                    raise ModelLoadError(
                        f"shape mismatch for {name}: checkpoint {tuple(part.shape)}, "
                        f"model expects {tuple(target.shape)}"
                    )
                target.copy_(part)
                rows_loaded[param_name] += part.shape[0] if part.dim() else 1
    _check_complete(model, params, rows_loaded)


def _check_complete(
    model: DecoderForCausalLM, params: dict[str, torch.nn.Parameter], rows_loaded: dict[str, int]
) -> None:
    missing = []
    for name, param in params.items():
        if model.config.tie_word_embeddings and name == "lm_head.weight":
            continue
        expected = param.shape[0] if param.dim() else 1
        if rows_loaded[name] < expected:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:8]) + (" ..." if len(missing) > 8 else "")
        raise ModelLoadError(f"checkpoint is missing {len(missing)} tensor(s): {shown}")
