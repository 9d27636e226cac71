"""Dummy quantized weights: `--load-format dummy --model-format awq` on a plain float config builds
the int4 model with valid random codes, so it runs (memory and speed figures without a checkpoint);
a dummy load uses a tokenizer that is in the folder; the generated benchmark tokenizer."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from litedeploy.bench.common import weight_bytes
from litedeploy.bench.dummy_tokenizer import make_dummy_folder
from litedeploy.chat.prompt import PromptEncoder
from litedeploy.config import EngineConfig, GenerationConfig, ModelConfig
from litedeploy.engine.engine import LLMEngine
from litedeploy.errors import ModelLoadError
from litedeploy.layers.quant_linear import Int4Linear, Int8Linear, unpack_awq, unpack_int4_rows
from litedeploy.loader.model_loader import _init_random, build_model, load_model, open_source
from litedeploy.loader.quantization import plan_quantization
from litedeploy.model_bundle import load_bundle
from litedeploy.reference_generation import ContiguousKVBackend
from litedeploy.tokenizer import Tokenizer
from tests.helpers.tiny_models import TINY

REPO_ROOT = Path(__file__).resolve().parents[2]
IDS = torch.tensor([5, 17, 42, 99, 3, 250, 7, 64])


def _config_folder(folder: Path, **overrides) -> Path:
    """A float Llama config.json and nothing else (what benchmarks/configs/ holds)."""
    folder.mkdir(parents=True, exist_ok=True)
    config = {"architectures": ["LlamaForCausalLM"], "model_type": "llama", **TINY,
              "rope_theta": 10000.0, "tie_word_embeddings": False, **overrides}
    (folder / "config.json").write_text(json.dumps(config))
    return folder


def _wide(tmp_path: Path) -> Path:  # input widths 128 / 256: AutoAWQ's group of 128 applies
    return _config_folder(tmp_path / "wide", hidden_size=128, intermediate_size=256)


def _logits(model, ids: torch.Tensor) -> torch.Tensor:
    backend = ContiguousKVBackend(model.config.num_layers, 1)
    backend.set_step([0], [len(ids)])
    with torch.no_grad():
        return model.compute_logits(model(ids, torch.arange(len(ids), device=ids.device),
                                            backend)).float()


def _unfinalized(folder: Path, dtype: torch.dtype = torch.float32):
    """The dummy int4 model before `finalize`: its Int4Linear still dequantizes in float."""
    source = open_source(folder)
    plan = plan_quantization(source, "awq", "dummy")
    model = build_model(ModelConfig.from_hf(source.hf_config), dtype, torch.device("cpu"), plan)
    _init_random(model)
    return model, plan


def test_dummy_awq_on_a_float_config_builds_int4_with_valid_codes(tmp_path):
    model, plan = _unfinalized(_wide(tmp_path))
    assert plan.method == "awq" and plan.awq_group_size == 128
    layers = model.model.layers
    assert not any(isinstance(m, nn.Linear) for m in layers.modules())  # all swapped
    int4 = [m for m in layers.modules() if isinstance(m, Int4Linear)]
    assert len(int4) == 4 * len(layers)  # qkv, o, gate_up, down
    for module in int4:
        codes = unpack_int4_rows(module.qweight)
        assert codes.min() == 0 and codes.max() == 15  # both nibbles random, whole range used
        assert (module.zeros == 8).all() and (module.scales > 0).all()
        # dequantized like any AWQ checkpoint: the spread of the float dummy weights
        assert 0.015 < module.dequantized().std() < 0.025
    assert not isinstance(model.lm_head, Int4Linear)  # AWQ keeps the head in float


def test_dummy_awq_runs_and_its_kernels_agree_with_the_dequantized_weights(tmp_path):
    folder = _wide(tmp_path)
    reference, _ = _unfinalized(folder)  # float32 dequantized weights, no kernel
    model, _ = load_model(open_source(folder), "float32", "cpu", "dummy", "awq")  # finalized
    expected, got = _logits(reference, IDS), _logits(model, IDS)
    assert torch.isfinite(got).all() and got.std() > 0
    # same seed, same codes; the CPU int4 kernel computes in bfloat16
    assert (got - expected).norm() / expected.norm() < 0.02  # measured 0.004


def test_dummy_awq_engine_generates(tmp_path):
    config = EngineConfig(device="cpu", dtype="float32", load_format="dummy", model_format="awq",
                          cache_max_tokens=512)
    engine = LLMEngine.from_pretrained(str(_wide(tmp_path)), config)
    assert engine.bundle.tokenizer is None  # config.json only
    [out] = engine.generate([IDS.tolist()], GenerationConfig(max_new_tokens=6, ignore_eos=True))
    assert out.generate_token_len == 6 and out.finish_reason == "length"


def test_dummy_int4_group_follows_the_input_widths(tmp_path):
    tiny = plan_quantization(open_source(_config_folder(tmp_path / "tiny")), "awq", "dummy")
    assert tiny.awq_group_size == 64  # hidden size 64: 128 does not divide it
    odd = _config_folder(tmp_path / "odd", hidden_size=48, intermediate_size=96)
    with pytest.raises(ModelLoadError, match="divisible by 32"):
        plan_quantization(open_source(odd), "awq", "dummy")
    with pytest.raises(ModelLoadError, match="quant_method 'awq'"):  # real weights: still refused
        plan_quantization(open_source(odd), "awq", "auto")


def test_dummy_int8_linear_gets_valid_codes(tmp_path):
    source = open_source(_wide(tmp_path))
    model = build_model(ModelConfig.from_hf(source.hf_config), torch.float32, torch.device("cpu"))
    mlp = model.model.layers[0].mlp
    mlp.down_proj = Int8Linear(mlp.down_proj.in_features, mlp.down_proj.out_features)
    _init_random(model)
    weight = mlp.down_proj.weight
    assert weight.dtype == torch.int8 and weight.min() == -127 and weight.max() == 127
    assert 0.015 < mlp.down_proj.dequantized().std() < 0.025
    mlp.down_proj.finalize()
    assert torch.isfinite(_logits(model, IDS)).all()


def test_dummy_float_weights_are_unchanged(tmp_path):
    """Without quantization the dummy model is what it always was: seeded N(0, 0.02), norms 1."""
    model, _ = load_model(open_source(_wide(tmp_path)), "float32", "cpu", "dummy")
    embed = model.model.embed_tokens.weight
    first = torch.randn(embed.shape, generator=torch.Generator().manual_seed(0)) * 0.02
    assert torch.equal(embed, first)
    assert (model.model.norm.weight == 1).all()
    assert not any(isinstance(m, Int4Linear) for m in model.modules())


def test_weight_bytes_count_the_repacked_int4_tensors(tmp_path):
    folder = _wide(tmp_path)
    int4, _ = load_model(open_source(folder), "float32", "cpu", "dummy", "awq")
    floats, _ = load_model(open_source(folder), "float32", "cpu", "dummy")
    layer_bytes = [weight_bytes(m.model.layers) for m in (int4, floats)]
    # 4 bits + a scale and zero per 128 weights against 32 bits (the norms stay float)
    assert 0.1 < layer_bytes[0] / layer_bytes[1] < 0.2
    head = weight_bytes(floats.lm_head)
    assert weight_bytes(int4) == weight_bytes(int4, skip_embedding=True) + head  # untied


def test_dummy_load_uses_the_tokenizer_of_the_folder(tmp_path):
    folder = make_dummy_folder(_wide(tmp_path), tmp_path / "with-tokenizer")
    bundle = load_bundle(str(folder), EngineConfig(device="cpu", load_format="dummy"))
    vocab = TINY["vocab_size"]
    assert bundle.tokenizer is not None and bundle.tokenizer.vocab_size == vocab
    assert bundle.tokenizer.decode([vocab - 3, 7]) == f"w{vocab - 3} w7"  # any sampled id
    assert PromptEncoder.for_bundle(bundle).template is not None
    assert bundle.stop_token_ids >= {2}


def test_generated_tokenizer_has_the_internlm2_vocab_and_specials(tmp_path):
    folder = make_dummy_folder(REPO_ROOT / "benchmarks/configs/internlm2-chat-1_8b", tmp_path)
    hf_config = json.loads((folder / "config.json").read_text())
    tokenizer = Tokenizer.from_folder(str(folder), hf_config)
    assert tokenizer.vocab_size == hf_config["vocab_size"] == 92544
    assert tokenizer.token_id("<|im_start|>") == 92543  # InternLM2's own ids
    assert tokenizer.token_id("<|im_end|>") == 92542
    assert (tokenizer.bos_token_id, tokenizer.eos_token_id) == (1, 2)
    assert tokenizer.encode("w7 w92000") == [1, 7, 92000]


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_dummy_awq_on_cuda_runs_the_triton_kernel_on_valid_codes(tmp_path):
    model, _ = load_model(open_source(_wide(tmp_path)), "bfloat16", "cuda", "dummy", "awq")
    int4 = [m for m in model.modules() if isinstance(m, Int4Linear)]
    assert int4 and all(m.mode == "triton" for m in int4)
    module = int4[0]
    qweight, scales, zeros = module.kernel_tensors  # AWQ layout [K, N/8], [K/G, N], [K/G, N]
    group = module.group_size
    weight = ((unpack_awq(qweight).float() - zeros.float().repeat_interleave(group, 0))
              * scales.float().repeat_interleave(group, 0))  # [K, N]
    x = torch.randn(5, module.in_features, device="cuda", dtype=torch.bfloat16)
    expected = x.float() @ weight
    got = module(x).float()
    assert (got - expected).norm() / expected.norm() < 0.02
    logits = _logits(model, IDS.cuda())
    assert torch.isfinite(logits).all() and logits.std() > 0
