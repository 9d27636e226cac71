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
from litedeploy.layers.quant_linear import Int4Linear, Int8Linear
from litedeploy.layers.rotary import RotaryEmbedding
from litedeploy.loader import weights
from litedeploy.loader.quantization import QuantizationPlan, plan_quantization
from litedeploy.loader.sharded import narrow_to_rank, rank_tensors
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
        if self.is_gguf:
            return self.path.stem
        from litedeploy.hub import repo_name_of

        return repo_name_of(self.path) or self.path.name  # a hub cache folder: its repo id


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


def gpu_memory_cap_bytes(max_gpu_memory: float | None, device: torch.device) -> int | None:
    """--max-gpu-memory in bytes, validated (None without one).

    CUDA only: on CPU the flag is refused, since silently ignoring a memory limit would let a
    run exceed what the user budgeted."""
    if max_gpu_memory is None:
        return None
    if not max_gpu_memory > 0:
        raise ModelLoadError(f"--max-gpu-memory must be a positive number of GiB, "
                             f"got {max_gpu_memory}")
    if device.type != "cuda":
        raise ModelLoadError(f"--max-gpu-memory caps CUDA memory, but the model runs on "
                             f"{device.type}; drop the flag (or use --device cuda on a GPU)")
    cap_bytes = int(max_gpu_memory * 2**30)
    total = torch.cuda.get_device_properties(device).total_memory
    if cap_bytes > total:
        raise ModelLoadError(f"--max-gpu-memory {max_gpu_memory:g} GiB is more than the "
                             f"device's {total / 2**30:.2f} GiB")
    return cap_bytes


def set_gpu_memory_cap(cap_bytes: int, device: torch.device) -> None:
    """Cap PyTorch's CUDA allocator for this process (before any weight exists)."""
    total = torch.cuda.get_device_properties(device).total_memory
    index = device.index if device.index is not None else torch.cuda.current_device()
    torch.cuda.set_per_process_memory_fraction(cap_bytes / total, index)
    logger.info("GPU memory capped at %.2f GiB of the device's %.2f GiB (--max-gpu-memory)",
                cap_bytes / 2**30, total / 2**30)


def module_tensor_bytes(model: torch.nn.Module) -> int:
    """Bytes of every parameter and buffer, each storage counted once (tied weights)."""
    seen: set[tuple[str, int]] = set()
    total = 0
    for tensor in [*model.parameters(), *model.buffers()]:
        key = (str(tensor.device), id(tensor) if tensor.is_meta else tensor.data_ptr())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    return total


def build_model(
    config: ModelConfig, dtype: torch.dtype, device: torch.device,
    quantization: QuantizationPlan | None = None, max_bytes: int | None = None,
) -> DecoderForCausalLM:
    with torch.device("meta"):
        model = model_class_for(config)(config)
        if quantization is not None:  # swap linears before any weight memory exists
            quantization.swap_linears(model)
    # cast while still on meta (free), then allocate once at the target dtype
    model = model.to(dtype)
    if max_bytes is not None:  # --max-gpu-memory: the weights must fit, then the cap is set
        _check_weights_fit(model, max_bytes)
        if device.type == "cuda":
            set_gpu_memory_cap(max_bytes, device)
    model = model.to_empty(device=device)
    # rotary inverse frequencies are computed, not loaded: rebuild them on the device in fp32
    model.rotary = RotaryEmbedding(config.rope, config.head_dim, config.max_position_embeddings)
    model.rotary.to(device)
    model.tie_weights()
    return model.eval()


def _check_weights_fit(model: DecoderForCausalLM, max_bytes: int) -> None:
    """A clear error instead of a CUDA out-of-memory traceback half way through loading."""
    if model.config.tie_word_embeddings:
        model.tie_weights()  # on meta, so the shared table counts once
    need = module_tensor_bytes(model)
    if need > max_bytes:
        raise ModelLoadError(f"the model's weights need {format_bytes(need)}, more than "
                             f"--max-gpu-memory {format_bytes(max_bytes)}; raise the cap "
                             "or load a quantized model (--model-format awq)")


def format_bytes(num_bytes: float) -> str:
    return (f"{num_bytes / 2**30:.2f} GiB" if num_bytes >= 2**30 / 10
            else f"{num_bytes / 2**20:.2f} MiB")


def load_model(
    source: ModelSource, dtype: str = "auto", device: str = "auto", load_format: str = "auto",
    model_format: str | None = None, max_gpu_memory: float | None = None,
) -> tuple[DecoderForCausalLM, ModelConfig]:
    plan = plan_quantization(source, model_format, load_format)
    tp = tp_state()
    config = ModelConfig.from_hf(plan.hf_config if plan else source.hf_config).shard(tp.world_size)
    target_device = resolve_device(device)
    target_dtype = resolve_dtype(dtype, config, target_device)
    cap_bytes = gpu_memory_cap_bytes(max_gpu_memory, target_device)
    model = build_model(config, target_dtype, target_device, plan, cap_bytes)
    if load_format == "dummy":
        _init_random(model)
    else:
        if plan is not None:
            tensors, total = plan.tensors()
            tensors = narrow_to_rank(tensors, model, tp.rank)
        else:
            tensors, total = _checkpoint_tensors(source, model, tp.rank)
        _load_tensors(model, tensors, total)
    if plan is not None:
        plan.finalize(model)
    if target_device.type == "cuda":  # hand back loading's scratch before the cache is sized
        torch.cuda.empty_cache()
    return model, config


def _checkpoint_tensors(source: ModelSource, model: DecoderForCausalLM,
                        rank: int) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
    """The checkpoint's tensors; under tensor parallelism only this rank's slices (sliced
    reads from safetensors; GGUF and .bin tensors are read whole and narrowed)."""
    if source.is_gguf:
        tensors = narrow_to_rank(source.gguf.tensors(), model, rank)
        return tensors, len(source.gguf.tensor_names())
    files = weights.find_weight_files(source.path)
    if model.config.tp_size == 1:
        return weights.iter_tensors(files), weights.count_tensors(files)
    return rank_tensors(files, model, rank), weights.count_tensors(files)


# Dummy weights are N(0, 0.02); quantized linears get random codes whose dequantized weights have
# that spread too. Int4: codes uniform in 0..15 around an integer zero point 8 (AWQ-valid), so
# (q - 8) has an RMS of sqrt(21.5); int8: codes uniform in -127..127, RMS sqrt(127 * 128 / 3).
DUMMY_STD = 0.02
_INT4_CODE_RMS = 21.5**0.5
_INT8_CODE_RMS = (127 * 128 / 3) ** 0.5


def _init_random(model: DecoderForCausalLM) -> None:
    """Random weights drawn on the model's device (fast on GPU), seeded: N(0, 0.02) floats, norms
    at 1, and valid packed codes for quantized linears (a float randn copied into their integer
    tensors would truncate to zeros)."""
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(0)
    quantized = [m for m in model.modules() if isinstance(m, (Int4Linear, Int8Linear))]
    handled = {id(t) for m in quantized for t in m.parameters(recurse=False) if t is not m.bias}
    with torch.no_grad():
        for module in quantized:
            _init_random_quantized(module, generator)
        for name, param in model.named_parameters():
            if id(param) in handled:
                continue
            if name.endswith(("layernorm.weight", "norm.weight")):
                param.fill_(1.0)
            else:  # drawn at the parameter's dtype, scaled in place: one temporary
                dtype = param.dtype if param.dtype.is_floating_point else torch.float32
                values = torch.randn(param.shape, generator=generator, device=device, dtype=dtype)
                param.copy_(values.mul_(DUMMY_STD))


def _init_random_quantized(module: Int4Linear | Int8Linear, generator: torch.Generator) -> None:
    def uniform(shape: tuple[int, ...], low: float, high: float) -> torch.Tensor:
        unit = torch.rand(shape, generator=generator, device=generator.device)
        return low + (high - low) * unit

    if isinstance(module, Int4Linear):
        # random bytes: two uniform nibbles each (qweight is uint8 [N, K/2])
        module.qweight.copy_(torch.randint(0, 256, module.qweight.shape, generator=generator,
                                           device=generator.device, dtype=torch.uint8))
        module.zeros.fill_(8.0)
        base = DUMMY_STD / _INT4_CODE_RMS
        module.scales.copy_(uniform(module.scales.shape, 0.5 * base, 1.5 * base))
    else:
        module.weight.copy_(torch.randint(-127, 128, module.weight.shape, generator=generator,
                                          device=generator.device, dtype=torch.int8))
        base = DUMMY_STD / _INT8_CODE_RMS
        module.scales.copy_(uniform(module.scales.shape, 0.5 * base, 1.5 * base))


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
