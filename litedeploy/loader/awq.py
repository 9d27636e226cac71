"""AWQ checkpoints (AutoAWQ / lmdeploy "gemm" format) converted to our int4 row form.

On disk, per quantized linear `X` with K inputs, N outputs and group size G:
  X.qweight int32 [K, N/8]   8 nibbles per int32 along N, in AWQ's order (AWQ_ORDER)
  X.qzeros  int32 [K/G, N/8] integer zero points, packed the same way
  X.scales  fp16  [K/G, N]
and w[n, k] = (q - zero) * scale. We transpose to output-major rows, so the model's usual name
mapping (q/k/v and gate/up packing, InternLM2's per-KV-group wqkv split) applies unchanged.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import torch

from litedeploy.errors import ModelLoadError
from litedeploy.layers.quant_linear import pack_int4_rows, unpack_awq


@dataclass(frozen=True)
class AWQConfig:
    bits: int = 4
    group_size: int = 128
    zero_point: bool = True
    modules_to_not_convert: tuple[str, ...] = ()

    def to_json(self) -> dict[str, Any]:
        # both spellings: transformers/AutoAWQ read bits/group_size, older lmdeploy w_bit/q_group
        return {
            "quant_method": "awq", "version": "gemm", "bits": self.bits,
            "group_size": self.group_size, "zero_point": self.zero_point,
            "w_bit": self.bits, "q_group_size": self.group_size,
            "modules_to_not_convert": list(self.modules_to_not_convert) or None,
        }


def is_awq(hf_config: dict[str, Any]) -> bool:
    quant = hf_config.get("quantization_config") or {}
    return str(quant.get("quant_method", "")).lower() == "awq"


def awq_config(hf_config: dict[str, Any]) -> AWQConfig:
    quant = hf_config.get("quantization_config") or {}
    if not is_awq(hf_config):
        raise ModelLoadError("--model-format awq needs a folder whose config.json has "
                             "quantization_config.quant_method 'awq' (write one with "
                             "`litedeploy lite auto_awq`)")
    bits = int(quant.get("bits", quant.get("w_bit", 4)))
    version = str(quant.get("version", "gemm")).lower()
    if bits != 4 or version != "gemm" or quant.get("zero_point") is False:
        raise ModelLoadError(f"AWQ checkpoint with bits={bits}, version={version!r}, "
                             f"zero_point={quant.get('zero_point')}: litedeploy reads 4-bit GEMM "
                             "AWQ with zero points only")
    skip = quant.get("modules_to_not_convert") or ()
    return AWQConfig(bits, int(quant.get("group_size", quant.get("q_group_size", 128))),
                     True, tuple(skip))


def awq_to_rows(name: str, tensor: torch.Tensor) -> tuple[str, torch.Tensor]:
    """One AWQ tensor -> (name, row-form tensor) of our Int4Linear; other tensors pass through."""
    if name.endswith(".qweight"):
        return name, pack_int4_rows(unpack_awq(tensor).T)  # [K, N] -> uint8 [N, K/2]
    if name.endswith(".qzeros"):
        return name[: -len("qzeros")] + "zeros", unpack_awq(tensor).T.float().contiguous()
    if name.endswith(".scales"):
        return name, tensor.float().T.contiguous()
    return name, tensor


def awq_tensors(
    tensors: Iterator[tuple[str, torch.Tensor]],
) -> Iterator[tuple[str, torch.Tensor]]:
    for name, tensor in tensors:
        yield awq_to_rows(name, tensor)


def rows_to_awq(
    qweight: torch.Tensor, scales: torch.Tensor, zeros: torch.Tensor
) -> dict[str, torch.Tensor]:
    """Our row form -> the AWQ tensors of one linear (the writer of `lite auto_awq`)."""
    from litedeploy.layers.quant_linear import pack_awq, unpack_int4_rows

    return {
        "qweight": pack_awq(unpack_int4_rows(qweight).T.contiguous()),
        "qzeros": pack_awq(zeros.round().to(torch.int32).T.contiguous()),
        "scales": scales.T.contiguous().to(torch.float16),
    }


# ---- writing: our internal names and packed rows -> the source architecture's HF names --------
_INTERNLM2_NAMES = (
    ("model.embed_tokens.", "model.tok_embeddings."), (".input_layernorm.", ".attention_norm."),
    (".post_attention_layernorm.", ".ffn_norm."), (".self_attn.o_proj.", ".attention.wo."),
    (".mlp.down_proj.", ".feed_forward.w2."), ("lm_head.", "output."),
)


def hf_parts(hf_config: dict[str, Any], name: str, rows: torch.Tensor
             ) -> list[tuple[str, torch.Tensor]]:
    """Our tensor (dim 0 = output rows) -> [(HF name, rows)]: q|k|v and gate|up split again,
    InternLM2's wqkv re-interleaved per KV head group."""
    internlm2 = hf_config.get("model_type") == "internlm2"
    heads = hf_config["num_attention_heads"]
    kv_heads = hf_config.get("num_key_value_heads", heads)
    head_dim = hf_config.get("head_dim") or hf_config["hidden_size"] // heads
    if ".self_attn.qkv_proj." in name:
        q, k, v = rows.split([heads * head_dim, kv_heads * head_dim, kv_heads * head_dim])
        if internlm2:
            rest = rows.shape[1:]
            grouped = torch.cat([q.reshape(kv_heads, -1, head_dim, *rest),
                                 k.reshape(kv_heads, 1, head_dim, *rest),
                                 v.reshape(kv_heads, 1, head_dim, *rest)], dim=1)
            return [(name.replace(".self_attn.qkv_proj.", ".attention.wqkv."),
                     grouped.reshape(-1, *rest))]
        return [(name.replace("qkv_proj", proj), part)
                for proj, part in zip(("q_proj", "k_proj", "v_proj"), (q, k, v))]
    if ".mlp.gate_up_proj." in name:
        gate, up = rows.chunk(2)
        names = ("feed_forward.w1", "feed_forward.w3") if internlm2 else ("gate_proj", "up_proj")
        old = "mlp.gate_up_proj" if internlm2 else "gate_up_proj"
        return [(name.replace(old, new), part) for new, part in zip(names, (gate, up))]
    if internlm2:
        for ours, theirs in _INTERNLM2_NAMES:
            name = name.replace(ours, theirs)
    return [(name, rows)]


def hf_state_dict(hf_config: dict[str, Any], model: torch.nn.Module,
                  quantized: dict[str, tuple[torch.Tensor, ...]]) -> dict[str, torch.Tensor]:
    """The AWQ checkpoint: quantized linears as qweight/qzeros/scales, the rest in float16."""
    state: dict[str, torch.Tensor] = {}
    for name, tensor in model.state_dict().items():
        module = name.rpartition(".")[0]
        if not name.startswith(("model.", "lm_head.")):
            continue
        if name == "lm_head.weight" and hf_config.get("tie_word_embeddings"):
            continue
        if module in quantized and name.endswith(".weight"):
            qweight, scales, zeros = quantized[module]
            parts = zip(*(hf_parts(hf_config, name, t) for t in (qweight, scales, zeros)))
            for (hf_name, q), (_, s), (_, z) in parts:
                stem = hf_name.removesuffix(".weight")
                for suffix, packed in rows_to_awq(q, s, z).items():
                    state[f"{stem}.{suffix}"] = packed.contiguous()
            continue
        for hf_name, part in hf_parts(hf_config, name, tensor.detach().cpu()):
            state[hf_name] = part.to(torch.float16).contiguous()
    return state
