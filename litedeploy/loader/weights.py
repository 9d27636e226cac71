"""Stream tensors out of a Hugging Face folder: safetensors (single or sharded) or pytorch .bin.

Each tensor is yielded on its own, so the caller can copy it into the model and drop it: peak host
memory stays at about one tensor beyond the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from pathlib import Path

import torch

from litedeploy.errors import ModelLoadError, ModelNotFoundError


def find_weight_files(folder: Path) -> list[Path]:
    for index_name in ("model.safetensors.index.json", "pytorch_model.bin.index.json"):
        index_path = folder / index_name
        if index_path.exists():
            weight_map = json.loads(index_path.read_text())["weight_map"]
            files = [folder / name for name in sorted(set(weight_map.values()))]
            missing = [f.name for f in files if not f.exists()]
            if missing:
                raise ModelNotFoundError(
                    f"{index_name} in {folder} lists shard(s) that are missing: {', '.join(missing)}"
                )
            return files
    single = [folder / "model.safetensors", folder / "pytorch_model.bin"]
    for path in single:
        if path.exists():
            return [path]
    shards = sorted(folder.glob("*.safetensors")) or sorted(folder.glob("pytorch_model*.bin"))
    if shards:
        return shards
    raise ModelNotFoundError(
        f"no weights in {folder}: expected model.safetensors, sharded *.safetensors with "
        "model.safetensors.index.json, or pytorch_model*.bin"
    )


def count_tensors(files: list[Path]) -> int | None:
    if all(f.suffix == ".safetensors" for f in files):

        total = 0
        for f in files:
            with _open_safetensors(f) as handle:
                total += len(list(handle.keys()))
        return total
    return None


def _open_safetensors(path: Path):
    from safetensors import safe_open

    try:
        return safe_open(str(path), framework="pt", device="cpu")
    except Exception as exc:
        raise ModelLoadError(f"cannot read {path.name} (truncated or corrupt?): {exc}") from exc


def iter_tensors(files: list[Path]) -> Iterator[tuple[str, torch.Tensor]]:
    for path in files:
        if path.suffix == ".safetensors":
            with _open_safetensors(path) as handle:
                for name in handle.keys():
                    try:
                        tensor = handle.get_tensor(name)
                    except Exception as exc:
                        raise ModelLoadError(
                            f"cannot read tensor {name} from {path.name} (truncated?): {exc}"
                        ) from exc
                    yield name, tensor
        else:
            try:
                state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
            except Exception as exc:
                raise ModelLoadError(f"cannot read {path.name} (truncated or corrupt?): {exc}") from exc
            for name in list(state):
                yield name, state.pop(name)
            del state


def file_size_gib(files: list[Path]) -> float:
    return sum(os.path.getsize(f) for f in files) / 2**30
