"""AWQ: the on-disk packing, `litedeploy lite auto_awq` on tiny random models, and reloading."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors import safe_open

from litedeploy.cli.main import main
from litedeploy.config import EngineConfig
from litedeploy.errors import ModelLoadError
from litedeploy.layers.quant_linear import Int4Linear, fake_quantize_int4, pack_awq, unpack_awq
from litedeploy.loader.model_loader import load_model, open_source
from litedeploy.reference_generation import ContiguousKVBackend
from tests.helpers.tiny_models import make_internlm2, make_llama

GROUP = 32
# random tiny models have no activation outliers, so AWQ ~ plain round-to-nearest: ~9% logits
LOGITS_BOUND = 0.15


def unpack_awq_by_the_book(packed: torch.Tensor) -> torch.Tensor:
    """Independent reading of the AWQ description: int32 j of a row packs columns 8j..8j+7;
    nibble i (bits 4i..4i+3) holds column 8j + [0, 2, 4, 6, 1, 3, 5, 7][i]."""
    order = [0, 2, 4, 6, 1, 3, 5, 7]
    rows, words = packed.shape
    out = torch.zeros(rows, words * 8, dtype=torch.int64)
    for r in range(rows):
        for j in range(words):
            value = int(packed[r, j]) & 0xFFFFFFFF
            for i in range(8):
                out[r, 8 * j + order[i]] = (value >> (4 * i)) & 0xF
    return out


def test_awq_packing_round_trips_against_the_format_description():
    q = torch.randint(0, 16, (6, 32), generator=torch.Generator().manual_seed(0))
    packed = pack_awq(q)
    assert packed.dtype == torch.int32 and packed.shape == (6, 4)
    assert torch.equal(unpack_awq_by_the_book(packed), q)
    assert torch.equal(unpack_awq(packed).long(), q)


def _logits(model, ids):
    backend = ContiguousKVBackend(model.config.num_layers, 1)
    backend.set_step([0], [len(ids)])
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids)), backend))


def _auto_awq(src, out, *extra):
    argv = ["lite", "auto_awq", str(src), "--work-dir", str(out), "--calib-seqlen", "64",
            "--calib-samples", "8", "--w-group-size", str(GROUP), "--device", "cpu", *extra]
    assert main(argv) == 0


def _rel(a, b):
    return ((a - b).norm() / b.norm()).item()


IDS = torch.randint(3, 300, (40,), generator=torch.Generator().manual_seed(1))


@pytest.mark.parametrize("maker", [make_llama, make_internlm2])
def test_auto_awq_folder_reloads_close_to_the_float_model(tmp_path, maker):
    src, twin = maker(tmp_path / "float")
    out = tmp_path / "awq"
    _auto_awq(src, out, "--search-scale")
    config = json.loads((out / "config.json").read_text())
    assert config["quantization_config"]["quant_method"] == "awq"
    assert config["quantization_config"]["group_size"] == GROUP
    assert any(p.name.startswith("tokenizer") for p in out.iterdir())
    with safe_open(str(out / "model.safetensors"), "pt") as f:
        names = set(f.keys())
        stem = ("model.layers.0.attention.wqkv" if maker is make_internlm2
                else "model.layers.0.self_attn.k_proj")
        qweight, qzeros, scales = (f.get_tensor(f"{stem}.{s}")
                                   for s in ("qweight", "qzeros", "scales"))
    hidden = twin.config.hidden_size
    assert qweight.dtype == torch.int32 and qweight.shape[0] == hidden
    assert qzeros.shape == (hidden // GROUP, qweight.shape[1]) and scales.dtype == torch.float16
    assert not any(name.endswith("proj.weight") or "wqkv.weight" in name for name in names)

    model, _ = load_model(open_source(out), "float32", "cpu")  # AWQ detected from config.json
    assert isinstance(model.model.layers[1].self_attn.qkv_proj, Int4Linear)
    assert isinstance(model.model.layers[1].mlp.down_proj, Int4Linear)
    with torch.no_grad():
        expected = twin(IDS[None]).logits[0]
    # a wrong wqkv interleave or nibble order gives errors near 100%
    assert _rel(_logits(model, IDS), expected) < LOGITS_BOUND


def test_awq_beats_round_to_nearest_with_activation_outliers(tmp_path):
    """Channels with large activations (big RMSNorm weights) are where AWQ earns its keep."""
    src, twin = make_llama(tmp_path / "float", hidden_size=128, intermediate_size=256)
    with torch.no_grad():
        for layer in twin.model.layers:
            for norm in (layer.input_layernorm, layer.post_attention_layernorm):
                norm.weight[:8] *= 25
    twin.save_pretrained(src, safe_serialization=True)
    _auto_awq(src, tmp_path / "awq", "--search-scale")
    awq_model, _ = load_model(open_source(tmp_path / "awq"), "float32", "cpu")
    with torch.no_grad():
        expected = twin(IDS[None]).logits[0]
        for name, module in twin.named_modules():  # plain round-to-nearest, same groups
            if isinstance(module, torch.nn.Linear) and name.startswith("model.layers."):
                module.weight.copy_(fake_quantize_int4(module.weight, GROUP))
        rtn = twin(IDS[None]).logits[0]
    awq_err, rtn_err = _rel(_logits(awq_model, IDS), expected), _rel(rtn, expected)
    assert awq_err < 0.85 * rtn_err  # measured 0.30 vs 0.40, (awq_err, rtn_err)


def test_model_format_awq_on_a_float_folder_is_refused(tmp_path):
    src, _ = make_llama(tmp_path / "float")
    EngineConfig(model_format="awq").validate()  # accepted as a flag ...
    with pytest.raises(ModelLoadError, match="quant_method 'awq'"):  # ... but needs AWQ data
        load_model(open_source(src), "float32", "cpu", model_format="awq")


def test_auto_awq_refuses_bad_inputs(tmp_path, capsys):
    src, _ = make_llama(tmp_path / "float")
    assert main(["lite", "auto_awq", str(src), "--work-dir", str(tmp_path / "o"),
                 "--w-group-size", "48", "--calib-seqlen", "32"]) == 2
    assert "does not divide" in capsys.readouterr().err
    assert main(["lite", "auto_awq", str(src), "--work-dir", str(tmp_path / "o"),
                 "--calib-dataset", "wikitext2"]) == 2
    assert "not downloaded" in capsys.readouterr().err
