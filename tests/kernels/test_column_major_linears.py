"""float32 linear weights re-laid column-major (layers/linear.py) for one-row CPU steps: same
shapes and values, other strides, and still transformers' logits (1e-4) and greedy tokens."""

from __future__ import annotations

import pytest
import torch

from litedeploy.config import GenerationConfig
from litedeploy.layers.linear import column_major_float_weights
from litedeploy.loader.model_loader import load_model, open_source
from litedeploy.reference_generation import generate
from tests.helpers import tiny_models
from tests.models.test_hf_equivalence import PROMPT, _hf_greedy, _our_logits


@pytest.mark.parametrize("tie", [False, True], ids=["untied", "tied"])
def test_column_major_weights_keep_transformers_tokens(tmp_path, tie) -> None:
    folder, hf_model = tiny_models.make_llama(tmp_path / "llama", tie=tie)
    model, _ = load_model(open_source(folder), dtype="float32", device="cpu")
    before = {name: p.detach().clone() for name, p in model.named_parameters()}
    num_linears = sum(isinstance(m, torch.nn.Linear) for m in model.modules())
    assert column_major_float_weights(model) == num_linears + 1  # and the LM head (or tied table)
    for name, param in model.named_parameters():
        assert torch.equal(param, before[name]), name  # values and shapes kept
        if param.dim() == 2 and (tie or "embed_tokens" not in name):
            assert param.T.is_contiguous(), name
    with torch.inference_mode():
        expected = hf_model(torch.tensor([PROMPT])).logits[0].float()
    torch.testing.assert_close(_our_logits(model, PROMPT), expected, atol=1e-4, rtol=1e-4)
    ours = generate(model, [PROMPT], GenerationConfig(max_new_tokens=32, ignore_eos=True))
    assert ours[0].token_ids == _hf_greedy(hf_model, PROMPT, 32)
