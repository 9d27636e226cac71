"""Tensor-parallel loading: each rank reads only its own slice of every sharded tensor.

safetensors files are read through `safe_open(...).get_slice(name)`, so a rank reads and holds
only its rows (or columns) of a sharded tensor, never the whole one. pytorch .bin files and GGUF
have no sliced reads: their tensors are read whole (a .bin memory-mapped) and narrowed.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from litedeploy.errors import ModelLoadError
from litedeploy.loader import weights
from litedeploy.models.decoder import DecoderForCausalLM

# (dim, start, length) of a rank's slice, as DecoderForCausalLM.tp_slice gives it
Piece = tuple[int, int, int]


def rank_tensors(files: list[Path], model: DecoderForCausalLM,
                 rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """(checkpoint name, this rank's part of the tensor) for every tensor of `files`."""
    for path in files:
        if path.suffix != ".safetensors":
            yield from narrow_to_rank(weights.iter_tensors([path]), model, rank)
            continue
        with weights._open_safetensors(path) as handle:
            for name in handle.keys():  # noqa: SIM118 - safe_open is not iterable
                piece = model.tp_slice(name, rank)
                try:
                    tensor = (handle.get_tensor(name) if piece is None
                              else read_slice(handle.get_slice(name), piece))
                except Exception as exc:
                    raise ModelLoadError(f"cannot read tensor {name} from {path.name} "
                                         f"(truncated?): {exc}") from exc
                yield name, tensor


def read_slice(tensor_slice, piece: Piece) -> torch.Tensor:
    """Only rows/columns [start, start + length) along `dim` of a safetensors slice. (InternLM2's
    packed wqkv is grouped per KV head, so a rank's whole KV-head groups are one row range.)"""
    dim, start, length = piece
    index = (slice(None),) * dim + (slice(start, start + length),)
    return tensor_slice[index]


def narrow_to_rank(tensors: Iterator[tuple[str, torch.Tensor]], model: DecoderForCausalLM,
                   rank: int) -> Iterator[tuple[str, torch.Tensor]]:
    """Whole tensors in, this rank's slice of each sharded one out (formats without sliced
    reads)."""
    for name, tensor in tensors:
        piece = model.tp_slice(name, rank)
        yield name, tensor if piece is None else tensor.narrow(*piece)
