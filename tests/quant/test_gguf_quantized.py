"""GGUF Q8_0 / Q4_0 / Q4_1 linears kept quantized (the default) against the dequantized path."""

from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as QType

from litedeploy.layers.quant_linear import Int4Linear, Int8Linear, dequantize_int4
from litedeploy.loader.default_model import default_model_path
from litedeploy.loader.model_loader import load_model, open_source
from litedeploy.loader.quantization import gguf_blocks_to_rows
from litedeploy.reference_generation import ContiguousKVBackend
from tests.helpers.teacher_forcing import assert_agrees


@pytest.mark.parametrize("type_name", ["Q4_0", "Q4_1", "Q8_0"])
def test_raw_blocks_decode_like_gguf_dequantize(type_name):
    weights = np.random.default_rng(0).standard_normal((24, 128)).astype(np.float32)
    weights[3, :32] = 0.25  # a flat block: Q4_1 stores d = 0 there
    raw = gguf.quants.quantize(weights, QType[type_name])
    expected = torch.from_numpy(gguf.quants.dequantize(raw, QType[type_name]))
    rows = gguf_blocks_to_rows(type_name, torch.from_numpy(raw))
    if type_name == "Q8_0":  # per-block scales requantized per row: half an int8 step
        ours = rows["weight"].float() * rows["scales"][:, None]
        assert (ours - expected).abs().max() <= rows["scales"].max() / 2 + 1e-6
    else:  # 4-bit blocks map exactly
        ours = dequantize_int4(rows["qweight"], rows["scales"], rows["zeros"], 32)
        torch.testing.assert_close(ours, expected, atol=1e-6, rtol=1e-5)


def _logits(model, ids):
    backend = ContiguousKVBackend(model.config.num_layers, 1)
    backend.set_step([0], [len(ids)])
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), backend))


@pytest.fixture(scope="module")
def smollm2():
    source = open_source(default_model_path())
    kept, _ = load_model(source, "float32", "cpu")  # the default: 4-bit kept
    dequantized, _ = load_model(source, "float32", "cpu", model_format="hf")
    return source, kept, dequantized


def test_smollm2_runs_in_its_quantized_form(smollm2):
    _, kept, dequantized = smollm2
    assert isinstance(kept.model.layers[0].self_attn.qkv_proj, Int4Linear)  # Q4_1
    assert isinstance(kept.model.layers[0].mlp.down_proj, Int4Linear)
    assert isinstance(kept.lm_head, Int8Linear)  # from token_embd's Q8_0 blocks, as llama.cpp
    assert isinstance(dequantized.model.layers[0].self_attn.qkv_proj, torch.nn.Linear)


def test_smollm2_logits_close_to_the_dequantized_path(smollm2):
    source, kept, dequantized = smollm2
    tokenizer = source.gguf.load_tokenizer()
    ids = torch.tensor(tokenizer.encode("The capital of France is Paris. The capital of Italy is"))
    ours, reference = _logits(kept, ids), _logits(dequantized, ids)
    # same 4-bit weights; the differences are bf16 activations and lm_head's int8 per row
    # (measured 0.022, min cosine 0.9991, max |diff| / range 0.032 on AVX-512, AVX2 and scalar)
    assert ((ours - reference).norm() / reference.norm()).item() < 0.03
    # float32's pick at every position is in our top 5; not "the same argmax": its top two are
    # 0.25 apart at one position, where the CPU's bf16 kernels decide
    agreement = assert_agrees(ours, reference, reference.argmax(-1).tolist(), top_k=5,
                              min_cosine=0.995, max_rel_diff=0.1)
    assert tokenizer.decode(reference[-1].argmax()).strip() == "Rome"
    assert agreement.ranks[-1] == 0  # Rome leads by 2.4; the paths differ there by < 0.6


def test_smollm2_greedy_text_is_sensible(smollm2):
    """float32 greedy text (exact tokens: float32); the kept form teacher-forced on it, since its
    own greedy run parts from float32's at a near tie (0.14 apart at the second token)."""
    source, kept, dequantized = smollm2
    tokenizer = source.gguf.load_tokenizer()
    ids = tokenizer.encode("Water boils at a temperature of 100 degrees")
    start = len(ids) - 1
    for _ in range(6):
        ids.append(int(_logits(dequantized, torch.tensor(ids))[-1].argmax()))
    text = tokenizer.decode(ids)
    assert "Celsius" in text or "C" in text.split("degrees", 1)[1], text
    ours, reference = _logits(kept, torch.tensor(ids)), _logits(dequantized, torch.tensor(ids))
    assert_agrees(ours[start:-1], reference[start:-1], ids[start + 1:], top_k=5,
                  min_cosine=0.995, max_rel_diff=0.1)
