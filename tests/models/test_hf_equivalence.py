"""Our models against transformers on tiny random checkpoints in the real on-disk formats."""

from __future__ import annotations

import pytest
import torch

from litedeploy.config import GenerationConfig
from litedeploy.loader.model_loader import load_model, open_source
from litedeploy.reference_generation import ContiguousKVBackend, generate
from tests.helpers import tiny_models

PROMPT = [1, 17, 42, 99, 5, 250, 7, 8, 9, 123, 45, 67]


def _our_logits(model, token_ids: list[int]) -> torch.Tensor:
    backend = ContiguousKVBackend(model.config.num_layers, 1)
    backend.set_step([0], [len(token_ids)])
    ids = torch.tensor(token_ids)
    positions = torch.arange(len(token_ids))
    rope_lens = torch.full_like(positions, len(token_ids))
    with torch.inference_mode():
        return model.compute_logits(model(ids, positions, backend, rope_lens))


def _hf_greedy(hf_model, token_ids: list[int], num_tokens: int) -> list[int]:
    with torch.inference_mode():
        out = hf_model.generate(
            torch.tensor([token_ids]), max_new_tokens=num_tokens, min_new_tokens=num_tokens,
            do_sample=False, eos_token_id=None, pad_token_id=0,
        )
    return out[0, len(token_ids):].tolist()


BUILDERS = {
    "llama": lambda d: tiny_models.make_llama(d),
    "llama-tied-llama3": lambda d: tiny_models.make_llama(
        d, tie=True,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                      "high_freq_factor": 4.0, "original_max_position_embeddings": 64}),
    "llama-linear": lambda d: tiny_models.make_llama(
        d, rope_scaling={"rope_type": "linear", "factor": 2.0}),
    "qwen2": lambda d: tiny_models.make_qwen2(d),
    "internlm2": lambda d: tiny_models.make_internlm2(d),
    "internlm2-bin": lambda d: tiny_models.make_internlm2(d, file_format="bin"),
}


@pytest.mark.parametrize("kind", list(BUILDERS))
def test_logits_and_greedy_match_transformers(tmp_path, kind):
    folder, hf_model = BUILDERS[kind](tmp_path / kind)
    model, _ = load_model(open_source(folder), dtype="float32", device="cpu")
    with torch.inference_mode():
        expected = hf_model(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(_our_logits(model, PROMPT), expected, atol=1e-4, rtol=1e-4)

    ours = generate(model, [PROMPT], GenerationConfig(max_new_tokens=32, ignore_eos=True))
    assert ours[0].token_ids == _hf_greedy(hf_model, PROMPT, 32)
    assert ours[0].finish_reason == "length"


def test_batched_reference_equals_single(tmp_path):
    folder, _ = tiny_models.make_qwen2(tmp_path / "q")
    model, _ = load_model(open_source(folder), dtype="float32", device="cpu")
    prompts = [PROMPT, PROMPT[:3], [1, 200, 201, 202, 203, 204, 205]]
    gen = GenerationConfig(max_new_tokens=12, ignore_eos=True)
    batched = generate(model, prompts, gen)
    for prompt, out in zip(prompts, batched):
        assert out.token_ids == generate(model, [prompt], gen)[0].token_ids


def test_dynamic_ntk_past_max_position_embeddings(tmp_path):
    # max_position_embeddings 32: the prompt (40) and every generated token run past it
    folder, hf_model = tiny_models.make_internlm2(tmp_path / "ntk", max_position_embeddings=32)
    model, config = load_model(open_source(folder), dtype="float32", device="cpu")
    assert config.rope.scaling_type == "dynamic"
    prompt = [(i * 37) % 290 + 3 for i in range(40)]
    with torch.inference_mode():
        expected = hf_model(torch.tensor([prompt])).logits[0].float()
    torch.testing.assert_close(_our_logits(model, prompt), expected, atol=1e-4, rtol=1e-4)
    ours = generate(model, [prompt], GenerationConfig(max_new_tokens=16, ignore_eos=True))
    assert ours[0].token_ids == _hf_greedy(hf_model, prompt, 16)


def test_wrong_wqkv_split_is_caught(tmp_path, monkeypatch):
    """A plain [q|k|v] split of InternLM2's interleaved wqkv must make the logits differ."""
    from litedeploy.models.internlm2 import InternLM2ForCausalLM

    def naive_split(self, name, wqkv):
        cfg = self.config
        q_rows, kv_rows = cfg.num_heads * cfg.head_dim, cfg.num_kv_heads * cfg.head_dim
        return wqkv.split([q_rows, kv_rows, kv_rows])

    folder, hf_model = tiny_models.make_internlm2(tmp_path / "i")
    monkeypatch.setattr(InternLM2ForCausalLM, "split_wqkv", naive_split)
    model, _ = load_model(open_source(folder), dtype="float32", device="cpu")
    with torch.inference_mode():
        expected = hf_model(torch.tensor([PROMPT])).logits[0].float()
    assert not torch.allclose(_our_logits(model, PROMPT), expected, atol=1e-3)
