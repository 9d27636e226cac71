"""Activation-aware weight quantization (AWQ) of a float checkpoint into an AWQ folder.

Layer by layer, on calibration text: record each linear's inputs, then
1. scale search: input channels that carry large activations matter more, so weights are scaled
   up by s = mean|x|^ratio before quantization and the previous op (RMSNorm weight, or the v / up
   rows feeding o_proj / down_proj) is divided by s: the float function is unchanged, the
   quantization error moves off the important channels. ratio is 0.5, or searched over a grid
   with --search-scale;
2. clipping: per output row and group, shrink the quantization range where that lowers the
   output error (not for q/k rows, whose errors the softmax amplifies);
3. int4 quantization, group-wise asymmetric, written in AWQ's GEMM packing (awq.py).
Next-layer inputs come from the original float layer, as in AutoAWQ.
"""

from __future__ import annotations

import json
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from tqdm.auto import tqdm

from litedeploy.errors import ModelLoadError
from litedeploy.layers.quant_linear import fake_quantize_int4, int4_codes, pack_int4_rows
from litedeploy.lite import BUILTIN_CALIB_TEXTS
from litedeploy.loader.awq import AWQConfig, hf_state_dict, is_awq
from litedeploy.loader.model_loader import load_model, open_source, resolve_device
from litedeploy.models.decoder import DecoderForCausalLM, DecoderLayer
from litedeploy.reference_generation import ContiguousKVBackend

N_GRID = 20
MAX_SHRINK = 0.5  # clipping tries ranges down to half the group's max
MAX_LOSS_TOKENS = 512  # input rows kept per linear for the scale / clip losses
_LINEARS = ("self_attn.qkv_proj", "self_attn.o_proj", "mlp.gate_up_proj", "mlp.down_proj")
_TOKENIZER_FILES = ("tokenizer*", "special_tokens_map.json", "generation_config.json", "*.model",
                    "vocab*", "merges.txt", "*.tiktoken", "*.py", "*.jinja", "chat_template*")


@dataclass(frozen=True)
class AutoAWQConfig:
    calib_dataset: str = "builtin"
    calib_samples: int = 128
    calib_seqlen: int = 2048
    batch_size: int = 1
    w_bits: int = 4
    w_group_size: int = 128
    search_scale: bool = False
    device: str = "auto"

    def validate(self) -> None:
        if self.w_bits != 4:
            raise ModelLoadError(f"--w-bits {self.w_bits}: only 4-bit AWQ is supported")
        if self.w_group_size < 2 or self.w_group_size % 2:
            raise ModelLoadError(f"--w-group-size must be an even number, got {self.w_group_size}")
        if min(self.calib_samples, self.calib_seqlen, self.batch_size) < 1:
            raise ModelLoadError("--calib-samples, --calib-seqlen and --batch-size must be >= 1")


@dataclass
class _Inputs:
    """What one linear saw: mean |x| per input channel and a row sample for the losses."""

    abs_sum: torch.Tensor
    count: int
    rows: list[torch.Tensor]

    @property
    def mean_abs(self) -> torch.Tensor:
        return self.abs_sum / self.count

    @property
    def sample(self) -> torch.Tensor:
        return torch.cat(self.rows)[:MAX_LOSS_TOKENS]


def auto_awq(model_path: str, work_dir: str, config: AutoAWQConfig) -> Path:
    """Quantize `model_path` (HF folder or GGUF) and write an AWQ folder to `work_dir`."""
    config.validate()
    source = open_source(model_path)
    if not source.is_gguf and is_awq(source.hf_config):
        raise ModelLoadError(f"{model_path} is already AWQ-quantized; pass the float model")
    device = resolve_device(config.device)
    dtype = "float32" if device.type == "cpu" else "float16"
    model, _ = load_model(source, dtype, str(device), model_format="hf")
    samples = calibration_samples(source, config, device)
    quantized = quantize_model(model, samples, config.w_group_size, config.search_scale)
    return write_awq_folder(source, model, quantized, Path(work_dir), config.w_group_size)


def calibration_samples(source, config: AutoAWQConfig, device: torch.device) -> list[torch.Tensor]:
    name = config.calib_dataset
    if name in BUILTIN_CALIB_TEXTS:
        text = BUILTIN_CALIB_TEXTS[name]
    elif Path(name).is_file():
        text = Path(name).read_text(encoding="utf-8")
    else:
        builtin = ", ".join(BUILTIN_CALIB_TEXTS)
        raise ModelLoadError(f"--calib-dataset {name!r} is neither a text file nor a built-in "
                             f"sample ({builtin}); datasets are not downloaded")
    ids = _tokenizer(source).encode(text)
    chunks = [ids[i: i + config.calib_seqlen] for i in range(0, len(ids), config.calib_seqlen)]
    chunks = [c for c in chunks if len(c) >= min(16, config.calib_seqlen)][: config.calib_samples]
    if not chunks:
        raise ModelLoadError(f"the calibration text {name!r} is too short")
    return [torch.tensor(c, device=device) for c in chunks]


def _tokenizer(source):
    from litedeploy.tokenizer import Tokenizer

    if source.is_gguf:
        return Tokenizer.from_hf(source.gguf.load_tokenizer(), source.hf_config)
    return Tokenizer.from_folder(str(source.path), source.hf_config)


@torch.no_grad()
def quantize_model(
    model: DecoderForCausalLM, samples: list[torch.Tensor], group_size: int, search_scale: bool
) -> dict[str, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Scale, clip and quantize every decoder linear in place; returns their int4 row forms."""
    for name in _LINEARS:
        in_features = model.model.layers[0].get_submodule(name).in_features
        if in_features % group_size:
            raise ModelLoadError(f"--w-group-size {group_size} does not divide {name}'s "
                                 f"{in_features} input features; pick a divisor")
    states = [(model.model.embed_tokens(ids), None) for ids in samples]
    rope = [model.rotary(torch.arange(len(ids), device=ids.device)) for ids in samples]
    quantized = {}
    layers = model.model.layers
    for layer_idx, layer in enumerate(tqdm(layers, desc="AWQ", unit="layer")):
        inputs, states = _run_layer(layer, states, rope, len(layers))
        _smooth(layer, inputs, model.config, group_size, search_scale)
        _clip(layer, inputs, model.config, group_size)
        for name in _LINEARS:
            weight = layer.get_submodule(name).weight
            q, scales, zeros = int4_codes(weight, group_size)
            quantized[f"model.layers.{layer_idx}.{name}"] = (pack_int4_rows(q.cpu()),
                                                              scales.cpu(), zeros.cpu())
    return quantized


def _run_layer(layer: DecoderLayer, states, rope, num_layers: int):
    inputs: dict[str, _Inputs] = {}

    def record(name: str):
        def hook(_module, args, _output):
            x = args[0].float()
            keep = max(1, MAX_LOSS_TOKENS // len(states))
            rows = x[torch.randperm(x.shape[0], generator=gen, device="cpu")[:keep].to(x.device)]
            if name not in inputs:
                inputs[name] = _Inputs(x.abs().sum(0), x.shape[0], [rows])
            else:
                found = inputs[name]
                found.abs_sum += x.abs().sum(0)
                found.count += x.shape[0]
                found.rows.append(rows)
        return hook

    gen = torch.Generator().manual_seed(0)
    handles = [layer.get_submodule(n).register_forward_hook(record(n)) for n in _LINEARS]
    new_states = []
    try:
        for (hidden, residual), (cos, sin) in zip(states, rope):
            backend = ContiguousKVBackend(num_layers, 1)
            backend.set_step([0], [hidden.shape[0]])
            new_states.append(layer(hidden, residual, cos, sin, backend))
    finally:
        for handle in handles:
            handle.remove()
    return inputs, new_states


def _smooth(layer: DecoderLayer, inputs, cfg, group_size: int, search_scale: bool) -> None:
    attn, mlp = layer.self_attn, layer.mlp
    q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
    v_rows = slice(q_rows + kv_rows, q_rows + 2 * kv_rows)
    up_rows = slice(cfg.intermediate_size, 2 * cfg.intermediate_size)
    ratios = [i / N_GRID for i in range(N_GRID)] if search_scale else [0.5]
    # (linear, its input's producer: a norm weight or rows of a linear)
    pairs = [("self_attn.qkv_proj", layer.input_layernorm.weight, None, None),
             ("mlp.gate_up_proj", layer.post_attention_layernorm.weight, None, None),
             ("mlp.down_proj", mlp.gate_up_proj.weight, mlp.gate_up_proj.bias, up_rows)]
    if q_rows == kv_rows:  # v feeds o_proj channel for channel only without GQA
        pairs.append(("self_attn.o_proj", attn.qkv_proj.weight, attn.qkv_proj.bias, v_rows))
    for name, prev_weight, prev_bias, rows in pairs:
        linear, seen = layer.get_submodule(name), inputs[name]
        scales = _search_scale(linear.weight.float(), seen, group_size, ratios)
        linear.weight.mul_(scales.to(linear.weight.dtype))
        if rows is None:
            prev_weight.div_(scales.to(prev_weight.dtype))
        else:
            prev_weight[rows].div_(scales[:, None].to(prev_weight.dtype))
            if prev_bias is not None:
                prev_bias[rows].div_(scales.to(prev_bias.dtype))
        seen.rows = [seen.sample / scales]  # the linear now sees x / s


def _search_scale(weight: torch.Tensor, seen: _Inputs, group_size: int, ratios) -> torch.Tensor:
    x = seen.sample
    reference = x @ weight.T
    best_loss, best = float("inf"), torch.ones_like(seen.mean_abs)
    for ratio in ratios:
        scales = seen.mean_abs.pow(ratio).clamp(min=1e-4)
        scales = scales / (scales.max() * scales.min()).sqrt()
        out = x @ (fake_quantize_int4(weight * scales, group_size) / scales).T
        loss = (out - reference).pow(2).mean().item()
        if loss < best_loss:
            best_loss, best = loss, scales
    return best


def _clip(layer: DecoderLayer, inputs, cfg, group_size: int) -> None:
    q_k_rows = (cfg.num_heads + cfg.num_kv_heads) * cfg.head_dim
    for name in _LINEARS:
        weight = layer.get_submodule(name).weight
        first_row = q_k_rows if name == "self_attn.qkv_proj" else 0  # never clip q / k
        part = weight[first_row:]
        limit = _search_clip(part.float(), inputs[name].sample, group_size)
        groups = part.view(part.shape[0], -1, group_size)
        limit = limit[..., None].to(part.dtype)
        groups.copy_(torch.maximum(torch.minimum(groups, limit), -limit))


def _search_clip(weight: torch.Tensor, x: torch.Tensor, group_size: int,
                 rows_per_chunk: int = 1024) -> torch.Tensor:
    """Per (row, group) max |w| minimizing the int4 output error on x: [N, K/G]."""
    x_groups = x.view(x.shape[0], -1, group_size)  # [T, K/G, G]
    limits = []
    for chunk in weight.split(rows_per_chunk):
        w = chunk.view(chunk.shape[0], -1, group_size)  # [n, K/G, G]
        original = w.abs().amax(-1)
        reference = torch.einsum("tgk,ngk->tng", x_groups, w)
        best_err = torch.full_like(original, float("inf"))
        best = original.clone()
        for step in range(int(MAX_SHRINK * N_GRID)):
            limit = original * (1 - step / N_GRID)
            clipped = torch.maximum(torch.minimum(w, limit[..., None]), -limit[..., None])
            q, scales, zeros = int4_codes(clipped.reshape(chunk.shape), group_size)
            deq = (q.view_as(w) - zeros[..., None]) * scales[..., None]
            err = (torch.einsum("tgk,ngk->tng", x_groups, deq) - reference).pow(2).mean(0)
            better = err < best_err
            best_err = torch.where(better, err, best_err)
            best = torch.where(better, limit, best)
        limits.append(best)
    return torch.cat(limits)


def write_awq_folder(source, model: DecoderForCausalLM, quantized, work_dir: Path,
                     group_size: int) -> Path:
    from safetensors.torch import save_file

    work_dir.mkdir(parents=True, exist_ok=True)
    state = hf_state_dict(source.hf_config, model, quantized)
    save_file(state, str(work_dir / "model.safetensors"), metadata={"format": "pt"})
    config = dict(source.hf_config)
    config["quantization_config"] = AWQConfig(4, group_size).to_json()
    config["torch_dtype"] = "float16"
    (work_dir / "config.json").write_text(json.dumps(config, indent=2))
    _copy_tokenizer(source, work_dir)
    return work_dir


def _copy_tokenizer(source, work_dir: Path) -> None:
    if source.is_gguf:
        source.gguf.load_tokenizer().save_pretrained(str(work_dir))
        return
    for pattern in _TOKENIZER_FILES:
        for path in source.path.glob(pattern):
            if path.is_file():
                shutil.copy2(path, work_dir / path.name)
