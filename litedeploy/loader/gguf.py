"""Read llama GGUF files as a Hugging Face Llama checkpoint.

GGUF names map to HF names here, tensors come out dequantized in HF orientation (out, in) with
llama.cpp's Q/K row permutation undone, one at a time: the reader memory-maps the file, so peak
memory is about one float tensor. This module is imported only for .gguf paths.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import torch
from gguf import GGMLQuantizationType as QType

from litedeploy.errors import ModelLoadError, ModelNotFoundError

SUPPORTED_TENSOR_TYPES: tuple[QType, ...] = tuple(
    QType[name] for name in ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q4_K", "Q5_K", "Q6_K"]
)

_GLOBAL_NAMES = {
    "token_embd": "model.embed_tokens",
    "output_norm": "model.norm",
    "output": "lm_head",
}
_LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "ffn_norm": "post_attention_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
# llama.cpp precomputes Llama-3 RoPE factors into this tensor; HF models compute them from the
# config instead, and transformers' own GGUF loader drops it too.
_SKIPPED_TENSORS = frozenset({"rope_freqs.weight"})


def hf_tensor_name(gguf_name: str) -> str | None:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`; None if unknown."""
    stem, _, suffix = gguf_name.rpartition(".")
    if suffix not in ("weight", "bias"):
        return None
    if stem in _GLOBAL_NAMES:
        return f"{_GLOBAL_NAMES[stem]}.{suffix}"
    parts = stem.split(".")
    if len(parts) == 3 and parts[0] == "blk" and parts[1].isdigit() and parts[2] in _LAYER_NAMES:
        return f"model.layers.{parts[1]}.{_LAYER_NAMES[parts[2]]}.{suffix}"
    return None


@dataclass
class GGUFCheckpoint:
    """An opened llama GGUF file: HF-style config, chat template and a tensor stream."""

    path: str
    hf_config: dict[str, Any]
    chat_template: str | None
    # (HF name, gguf ReaderTensor) in file order
    _entries: list[tuple[str, Any]] = field(repr=False)

    def tensor_names(self) -> list[str]:
        return [name for name, _ in self._entries]

    def tensors(self, dtype: torch.dtype = torch.float32) -> Iterator[tuple[str, torch.Tensor]]:
        """Yield (HF name, dequantized tensor), one at a time, in HF orientation."""
        for name, tensor in self._entries:
            yield name, self.dequantized(name, tensor).to(dtype)

    def entries(self) -> list[tuple[str, Any]]:
        """(HF name, gguf ReaderTensor) pairs; `.tensor_type` tells each one's quantization."""
        return list(self._entries)

    def dequantized(self, name: str, tensor: Any) -> torch.Tensor:
        return self.hf_row_order(name, torch.from_numpy(_dequantize(tensor)))

    def raw_rows(self, name: str, tensor: Any) -> torch.Tensor:
        """The quantized blocks as uint8 [rows, bytes per row], rows in HF order (the Q/K
        permutation is on output rows, so it applies to packed rows as well)."""
        raw = torch.from_numpy(np.array(tensor.data, dtype=np.uint8, copy=True))
        return self.hf_row_order(name, raw.reshape(int(tensor.shape[-1]), -1))

    def hf_row_order(self, name: str, weight: torch.Tensor) -> torch.Tensor:
        if ".self_attn.q_proj." in name:
            return _undo_rope_permute(weight, self.hf_config["num_attention_heads"])
        if ".self_attn.k_proj." in name:
            return _undo_rope_permute(weight, self.hf_config["num_key_value_heads"])
        return weight

    def load_tokenizer(self):
        """A transformers fast tokenizer built from the GGUF metadata (vocab, merges, specials)."""
        from transformers import AutoTokenizer

        cache_dir = _tokenizer_cache_dir(self.path)
        if cache_dir is not None and (cache_dir / "tokenizer.json").exists():
            try:
                cached = AutoTokenizer.from_pretrained(str(cache_dir))
            except Exception:  # noqa: BLE001 - a stale or broken cache: rebuild below
                cached = None
            if cached is not None and self.conversion_problem(cached) is None:
                return cached  # else saved by a transformers that converted it wrongly
        folder, file_name = os.path.split(os.path.abspath(self.path))
        try:
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=file_name)
        except (ValueError, KeyError, TypeError) as exc:
            raise ModelLoadError(
                f"cannot build a tokenizer from the metadata of {self.path}: {exc}"
            ) from exc
        problem = self.conversion_problem(tokenizer)
        if problem is not None:
            import transformers

            raise ModelLoadError(
                f"transformers {transformers.__version__} converted the tokenizer of {self.path} "
                f"wrongly ({problem}); upgrade it: pip install -U 'transformers>=5.24'")
        if cache_dir is not None:
            # converting GGUF metadata takes seconds; the saved tokenizer.json loads in a blink
            try:
                tokenizer.save_pretrained(str(cache_dir))
            except OSError:
                pass
        return tokenizer

    def conversion_problem(self, tokenizer) -> str | None:
        """What is wrong with a tokenizer converted from this file's metadata, or None.

        transformers 5.17 turned SmolLM2's byte-level BPE into one with a SentencePiece decoder
        and <|im_start|> as eos: replies came back with 'Ġ' for spaces, never stopped, and
        grammar masks read the vocabulary wrongly."""
        eos_id = self.hf_config.get("eos_token_id")
        if eos_id is not None and tokenizer.eos_token_id != eos_id:
            return f"eos token id {tokenizer.eos_token_id}, the file says {eos_id}"
        sample = "a b, c"  # spaces: byte-level 'Ġ' and SentencePiece '▁' both decode to ' '
        decoded = tokenizer.decode(tokenizer.encode(sample, add_special_tokens=False))
        if decoded.strip() != sample:
            return f"{sample!r} decodes back as {decoded!r}"
        return None


def _tokenizer_cache_dir(path: str) -> Path | None:
    """A per-file cache folder keyed by the file's path, size and mtime (None if no home)."""
    try:
        stat = os.stat(path)
    except OSError:
        return None
    root = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
    key = hashlib.sha256(
        f"{os.path.abspath(path)}:{stat.st_size}:{stat.st_mtime_ns}".encode()
    ).hexdigest()[:24]
    return Path(root) / "litedeploy" / "gguf-tokenizers" / key


def open_gguf(path: str) -> GGUFCheckpoint:
    """Open a llama GGUF file; checks architecture, tensor names and types before any loading."""
    reader = _open_reader(path)
    arch = _field(reader, "general.architecture")
    if arch != "llama":
        raise ModelLoadError(
            f"{path} has GGUF architecture {arch!r}; only llama GGUF files are supported "
            "(Llama, Mistral, SmolLM and other models llama.cpp stores as 'llama')."
        )
    entries = _checked_entries(reader, path)
    return GGUFCheckpoint(
        path=path,
        hf_config=_hf_config(reader, entries),
        chat_template=_field(reader, "tokenizer.chat_template"),
        _entries=entries,
    )


def _open_reader(path: str) -> gguf.GGUFReader:
    if not os.path.isfile(path):
        raise ModelNotFoundError(f"GGUF file not found: {path}")
    try:
        return gguf.GGUFReader(path, "r")
    except Exception as exc:  # the reader signals bad magic / truncation in many ways
        raise ModelLoadError(
            f"{path} is not a valid GGUF file (wrong format or truncated): {exc}"
        ) from exc


def _checked_entries(reader: gguf.GGUFReader, path: str) -> list[tuple[str, Any]]:
    supported = ", ".join(t.name for t in SUPPORTED_TENSOR_TYPES)
    entries = []
    for tensor in reader.tensors:
        if tensor.name in _SKIPPED_TENSORS:
            continue
        if tensor.tensor_type not in SUPPORTED_TENSOR_TYPES:
            raise ModelLoadError(
                f"tensor {tensor.name!r} in {path} has type {tensor.tensor_type.name}, which "
                f"litedeploy cannot dequantize; supported types: {supported}. "
                "Use a GGUF file quantized to one of these (e.g. Q4_K_M, Q8_0 or F16)."
            )
        hf_name = hf_tensor_name(tensor.name)
        if hf_name is None:
            raise ModelLoadError(
                f"tensor {tensor.name!r} in {path} is not part of a llama model; "
                "litedeploy knows token_embd, output_norm, output and blk.N.{attn,ffn}_* tensors."
            )
        entries.append((hf_name, tensor))
    return entries


def _field(reader: gguf.GGUFReader, key: str, default: Any = None) -> Any:
    found = reader.get_field(key)
    return found.contents() if found is not None else default


def _hf_config(reader: gguf.GGUFReader, entries: list[tuple[str, Any]]) -> dict[str, Any]:
    """LlamaForCausalLM-style config.json dict from `llama.*` and `tokenizer.ggml.*` metadata."""

    def meta(key: str, default: Any = None) -> Any:
        return _field(reader, f"llama.{key}", default)

    shapes = {name: tuple(int(d) for d in tensor.shape) for name, tensor in entries}
    if "model.embed_tokens.weight" not in shapes:
        raise ModelLoadError("the GGUF file has no token_embd.weight tensor")
    hidden_size, embed_rows = shapes["model.embed_tokens.weight"]  # GGUF shapes are (in, out)
    num_heads = meta("attention.head_count")
    config: dict[str, Any] = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": "llama",
        "vocab_size": int(meta("vocab_size", embed_rows)),
        "hidden_size": int(meta("embedding_length", hidden_size)),
        "intermediate_size": int(meta("feed_forward_length")),
        "num_hidden_layers": int(meta("block_count")),
        "num_attention_heads": int(num_heads),
        "num_key_value_heads": int(meta("attention.head_count_kv", num_heads)),
        "max_position_embeddings": int(meta("context_length", 2048)),
        "rms_norm_eps": float(meta("attention.layer_norm_rms_epsilon", 1e-5)),
        "rope_theta": float(meta("rope.freq_base", 10000.0)),
        "hidden_act": "silu",
        "tie_word_embeddings": "lm_head.weight" not in shapes,
        "bos_token_id": _field(reader, "tokenizer.ggml.bos_token_id"),
        "eos_token_id": _field(reader, "tokenizer.ggml.eos_token_id"),
        "torch_dtype": "float32",
    }
    # key_length is the explicit head size; llama.cpp's converter writes the rotary size (equal to
    # head_dim for llama) when the head size is not hidden/heads, so either one gives it.
    head_dim = meta("attention.key_length", meta("rope.dimension_count"))
    if head_dim is not None:
        config["head_dim"] = int(head_dim)
    pad_token_id = _field(reader, "tokenizer.ggml.padding_token_id")
    if pad_token_id is not None:
        config["pad_token_id"] = pad_token_id
    rope_scaling = _rope_scaling(meta)
    if rope_scaling is not None:
        config["rope_scaling"] = rope_scaling
    if any(name.endswith("self_attn.q_proj.bias") for name, _ in entries):
        config["attention_bias"] = True
    return config


def _rope_scaling(meta) -> dict[str, Any] | None:
    kind = meta("rope.scaling.type")
    factor = meta("rope.scaling.factor")
    if kind is None and meta("rope.scale_linear") is not None:  # older llama.cpp files
        kind, factor = "linear", meta("rope.scale_linear")
    if kind in (None, "none"):
        return None
    scaling: dict[str, Any] = {"rope_type": kind, "factor": float(factor or 1.0)}
    original_len = meta("rope.scaling.original_context_length")
    if original_len is not None:
        scaling["original_max_position_embeddings"] = int(original_len)
    return scaling


def _dequantize(tensor: Any) -> np.ndarray:
    """float32 array in numpy order of the GGUF dims reversed, i.e. HF's (out, in)."""
    array = gguf.quants.dequantize(tensor.data, tensor.tensor_type)
    array = array.reshape(tuple(int(d) for d in reversed(tensor.shape)))
    if array.dtype != np.float32:
        array = array.astype(np.float32)
    if not array.flags.writeable:  # F32 data is a view of the read-only memory map
        array = array.copy()
    return array


def _undo_rope_permute(weight: torch.Tensor, num_heads: int) -> torch.Tensor:
    """Inverse of llama.cpp's convert permutation of Q/K rows.

    llama.cpp interleaves the two rotary halves of each head row by row, rows ordered
    (head_dim/2, 2); HF keeps the halves apart, rows ordered (2, head_dim/2).
    """
    rows = weight.shape[0]
    rest = weight.shape[1:]
    return (
        weight.reshape(num_heads, rows // num_heads // 2, 2, *rest)
        .transpose(1, 2)
        .reshape(rows, *rest)
    )
