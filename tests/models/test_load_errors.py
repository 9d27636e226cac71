"""Each loading error a user can make is raised with a message that says what is wrong."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from litedeploy.errors import ModelLoadError, ModelNotFoundError
from litedeploy.loader.model_loader import load_model, open_source
from tests.helpers import tiny_models


def _load(path):
    return load_model(open_source(path), dtype="float32", device="cpu")


def test_path_does_not_exist(tmp_path):
    with pytest.raises(ModelNotFoundError, match="does not exist"):
        _load(tmp_path / "nope")
    assert issubclass(ModelNotFoundError, FileNotFoundError)


def test_no_config_json(tmp_path):
    with pytest.raises(ModelNotFoundError, match="no config.json"):
        _load(tmp_path)


def test_unknown_architecture_lists_supported(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"architectures": ["GPT2LMHeadModel"]}))
    with pytest.raises(ModelLoadError, match="GPT2LMHeadModel.*InternLM2ForCausalLM"):
        _load(tmp_path)
    assert issubclass(ModelLoadError, ValueError)


def test_missing_shard_is_named(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    names = sorted(state)
    save_file({k: state[k] for k in names[: len(names) // 2]},
              str(folder / "model-00001-of-00002.safetensors"))
    save_file({k: state[k] for k in names[len(names) // 2:]},
              str(folder / "model-00002-of-00002.safetensors"))
    (folder / "model.safetensors").unlink()
    index = {"weight_map": {k: f"model-0000{1 + (i >= len(names) // 2)}-of-00002.safetensors"
                            for i, k in enumerate(names)}}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    _load(folder)  # the sharded folder loads
    (folder / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(ModelNotFoundError, match="model-00002-of-00002.safetensors"):
        _load(folder)


def test_truncated_shard_is_named(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    path = folder / "model.safetensors"
    path.write_bytes(path.read_bytes()[: path.stat().st_size // 2])
    with pytest.raises(ModelLoadError, match="model.safetensors"):
        _load(folder)


def test_missing_tensor_is_named(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    del state["model.layers.1.mlp.up_proj.weight"]
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.1.mlp.gate_up_proj.weight"):
        _load(folder)


def test_shape_mismatch_names_the_tensor(tmp_path):
    folder, _ = tiny_models.make_llama(tmp_path / "m")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.self_attn.o_proj.weight"] = torch.zeros(64, 32)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="model.layers.0.self_attn.o_proj.weight"):
        _load(folder)


def test_internlm2_wqkv_shape_mismatch(tmp_path):
    folder, _ = tiny_models.make_internlm2(tmp_path / "i")
    state = load_file(str(folder / "model.safetensors"))
    state["model.layers.0.attention.wqkv.weight"] = torch.zeros(100, 64)
    save_file(state, str(folder / "model.safetensors"))
    with pytest.raises(ModelLoadError, match="wqkv"):
        _load(folder)


def test_non_gguf_file(tmp_path):
    path = tmp_path / "weights.bin"
    path.write_bytes(b"junk")
    with pytest.raises(ModelLoadError, match="not a .gguf"):
        _load(path)
