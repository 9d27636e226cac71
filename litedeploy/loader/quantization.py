"""The quantization handler: which linears become Int8Linear/Int4Linear, swapping them on the
meta-built model before any weight is allocated, and the tensor stream that fills them.

Two sources of quantized weights:
- AWQ folders (`quantization_config.quant_method == "awq"`, or `--model-format awq`);
- GGUF files: Q8_0 / Q4_0 / Q4_1 linears stay quantized by default (raw blocks repacked into our
  row form, llama.cpp's Q/K row permutation undone on the packed rows); `--model-format hf`
  keeps the old behaviour of dequantizing everything to --dtype.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from litedeploy.errors import ModelLoadError
from litedeploy.layers.quant_linear import Int4Linear, Int8Linear, pack_int4_rows, quantize_int8

GGUF_BLOCK = 32  # elements per Q8_0 / Q4_0 / Q4_1 block
_GGUF_KIND = {"Q8_0": "int8", "Q4_0": "int4", "Q4_1": "int4"}


@dataclass(frozen=True)
class LinearQuant:
    kind: str  # "int4" | "int8"
    group_size: int = 0  # int4 only


@dataclass
class QuantizationPlan:
    """Decided from the source before the model is built; applied by the model loader."""

    method: str  # "awq" | "gguf"
    hf_config: dict[str, Any]  # the source's config, adjusted (GGUF: lm_head untied if quantized)
    source: Any = field(repr=False)
    awq_group_size: int = 128
    awq_skip: tuple[str, ...] = ()
    gguf_types: dict[str, str] = field(default_factory=dict)  # HF linear weight name -> type
    linears: dict[str, LinearQuant] = field(default_factory=dict)  # filled by swap_linears

    # ---- before loading: module swap on the meta model ------------------------------------
    def swap_linears(self, model: nn.Module) -> None:
        if getattr(model.config, "tp_size", 1) > 1:
            raise ModelLoadError("quantized weights (AWQ, GGUF kept quantized) do not support "
                                 "--tp > 1 yet; use --tp 1, or --model-format hf for a GGUF")
        self.linears = self._choose(model)
        for module_name, quant in self.linears.items():
            parent_name, _, child = module_name.rpartition(".")
            parent = model.get_submodule(parent_name) if parent_name else model
            linear = getattr(parent, child)  # nn.Linear or the LM head: any [out, in] weight
            out_features, in_features = linear.weight.shape
            has_bias = getattr(linear, "bias", None) is not None
            if quant.kind == "int8":
                new = Int8Linear(in_features, out_features, has_bias)
            else:
                new = Int4Linear(in_features, out_features, has_bias, quant.group_size)
            setattr(parent, child, new)

    def _choose(self, model: nn.Module) -> dict[str, LinearQuant]:
        if self.method == "awq":
            return {
                name: LinearQuant("int4", self.awq_group_size)
                for name, module in model.named_modules()
                if isinstance(module, nn.Linear) and name.startswith("model.layers.")
                and not any(skip in name for skip in self.awq_skip)
            }
        kinds: dict[str, set[str | None]] = {}
        for hf_name, type_name in self.gguf_types.items():
            for param_name, _, _ in model.map_weight(hf_name, torch.empty(0)):
                module_name = param_name.removesuffix(".weight")
                kinds.setdefault(module_name, set()).add(_GGUF_KIND.get(type_name))
        # a packed module (q|k|v, gate|up) is quantized only if all its parts agree
        return {name: LinearQuant(kind.pop(), GGUF_BLOCK) for name, kind in kinds.items()
                if len(kind) == 1 and None not in kind}

    # ---- loading -------------------------------------------------------------------------
    def tensors(self) -> tuple[Iterator[tuple[str, torch.Tensor]], int | None]:
        if self.method == "awq":
            from litedeploy.loader import weights
            from litedeploy.loader.awq import awq_tensors

            files = weights.find_weight_files(self.source.path)
            return awq_tensors(weights.iter_tensors(files)), weights.count_tensors(files)
        return self._gguf_tensors(), None

    def _gguf_tensors(self) -> Iterator[tuple[str, torch.Tensor]]:
        checkpoint = self.source.gguf
        kept = {name for name, kind in self.gguf_types.items() if kind in _GGUF_KIND}
        for name, entry in checkpoint.entries():
            if name == "model.embed_tokens.weight" and "lm_head.weight" in kept:
                yield from _gguf_quantized("lm_head.weight", checkpoint, name, entry)
            if name in kept:
                yield from _gguf_quantized(name, checkpoint, name, entry)
            else:
                yield name, checkpoint.dequantized(name, entry)

    @staticmethod
    def finalize(model: nn.Module) -> None:
        """Repack every quantized linear for its device's kernel (after loading)."""
        for module in model.modules():
            if isinstance(module, (Int4Linear, Int8Linear)):
                module.finalize()


def plan_quantization(source: Any, model_format: str | None,
                      load_format: str = "auto") -> QuantizationPlan | None:
    """None for a plain float checkpoint (or `--model-format hf`: dequantize everything).

    `--load-format dummy --model-format awq` on a float folder builds the int4 model that the
    folder's AWQ checkpoint would load into (AutoAWQ's defaults: 4 bits, group 128), filled with
    random codes: the memory and speed of int4 weights without quantizing anything."""
    from litedeploy.loader.awq import awq_config, is_awq

    if model_format == "hf":
        return None
    if source.is_gguf:
        if model_format == "awq":
            raise ModelLoadError("--model-format awq needs an AWQ folder, not a GGUF file")
        return _gguf_plan(source)
    if model_format == "awq" or is_awq(source.hf_config):
        dummy_int4 = load_format == "dummy" and not is_awq(source.hf_config)
        config = _dummy_awq_config(source.hf_config) if dummy_int4 else awq_config(source.hf_config)
        return QuantizationPlan("awq", source.hf_config, source, config.group_size,
                                config.modules_to_not_convert)
    return None


def _dummy_awq_config(hf_config: dict[str, Any]) -> Any:
    """AutoAWQ's group of 128, or the largest smaller power of two dividing every linear's
    input width (tiny test models)."""
    from litedeploy.loader.awq import AWQConfig

    heads = hf_config["num_attention_heads"]
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    widths = (hf_config["hidden_size"], hf_config["intermediate_size"], heads * head_dim)
    for group_size in (128, 64, 32):
        if all(width % group_size == 0 for width in widths):
            return AWQConfig(group_size=group_size)
    raise ModelLoadError(f"dummy int4 weights need input widths {widths} divisible by 32")


def _gguf_plan(source: Any) -> QuantizationPlan | None:
    types = {name: entry.tensor_type.name for name, entry in source.gguf.entries()
             if name.endswith("proj.weight") or name == "lm_head.weight"}
    hf_config = dict(source.hf_config)
    embed_type = next(entry.tensor_type.name for name, entry in source.gguf.entries()
                      if name == "model.embed_tokens.weight")
    if hf_config.get("tie_word_embeddings") and embed_type in _GGUF_KIND:
        # as llama.cpp does: the output projection reuses token_embd's quantized blocks (the
        # embedding lookup itself is dequantized); untie so lm_head gets its own module
        hf_config["tie_word_embeddings"] = False
        types["lm_head.weight"] = embed_type
    if not any(kind in _GGUF_KIND for kind in types.values()):
        return None
    return QuantizationPlan("gguf", hf_config, source, gguf_types=types)


# ---- GGUF blocks -> our row form ---------------------------------------------------------
def _gguf_quantized(
    out_name: str, checkpoint: Any, name: str, entry: Any
) -> Iterator[tuple[str, torch.Tensor]]:
    raw = checkpoint.raw_rows(name, entry)  # uint8 [rows, row_bytes], HF row order
    stem = out_name.removesuffix(".weight")
    for suffix, tensor in gguf_blocks_to_rows(entry.tensor_type.name, raw).items():
        yield f"{stem}.{suffix}", tensor


def gguf_blocks_to_rows(type_name: str, raw: torch.Tensor) -> dict[str, torch.Tensor]:
    """Raw Q8_0/Q4_0/Q4_1 rows -> our Int8Linear / Int4Linear tensors (by suffix)."""
    rows = raw.shape[0]
    block_bytes = {"Q8_0": 34, "Q4_0": 18, "Q4_1": 20}[type_name]
    blocks = raw.reshape(rows, -1, block_bytes)  # [rows, K/32, bytes]
    scales = _fp16(blocks[..., 0:2])
    if type_name == "Q8_0":
        q = blocks[..., 2:].contiguous().view(torch.int8).float()
        weight, row_scales = quantize_int8((q * scales[..., None]).reshape(rows, -1))
        return {"weight": weight, "scales": row_scales}  # per-block scales -> per row
    qs = blocks[..., -16:].numpy()  # byte j: element j in the low nibble, j + 16 in the high
    q = torch.from_numpy(np.concatenate([qs & 0xF, qs >> 4], axis=-1).reshape(rows, -1))
    if type_name == "Q4_0":  # w = d * (q - 8)
        zeros = torch.full_like(scales, 8.0)
    else:  # Q4_1: w = d * q + m, i.e. zero = -m / d; a block of equal values has d = 0, q = 0
        mins = _fp16(blocks[..., 2:4])
        flat = scales == 0
        scales = torch.where(flat, torch.ones_like(scales), scales)
        zeros = -mins / scales
    return {"qweight": pack_int4_rows(q), "scales": scales, "zeros": zeros}


def _fp16(two_bytes: torch.Tensor) -> torch.Tensor:
    return two_bytes.contiguous().view(torch.float16).squeeze(-1).float()


def quantize_linears(model: nn.Module, kind: str = "int8") -> int:
    """Quantize-on-load from float weights: every nn.Linear inside the decoder layers becomes an
    Int8Linear (symmetric per output channel) holding its weights, ready for this device's
    kernel. The embedding and LM head stay as they are. Returns how many were replaced."""
    if kind != "int8":
        raise ValueError(f"quantize_linears supports int8, got {kind!r}")
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and ".layers." in name]
    with torch.no_grad():
        for name, linear in targets:
            parent_name, _, child = name.rpartition(".")
            out_features, in_features = linear.weight.shape
            new = Int8Linear(in_features, out_features, linear.bias is not None)
            new.to(linear.weight.device)
            codes, scales = quantize_int8(linear.weight)
            new.weight.copy_(codes)
            new.scales.copy_(scales)
            if linear.bias is not None:
                new.bias.copy_(linear.bias)
            new.finalize()
            setattr(model.get_submodule(parent_name), child, new)
    return len(targets)
