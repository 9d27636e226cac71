"""Machine-independent comparisons of a quantized or bfloat16 path with a float32 reference.

Greedy tokens of a bfloat16 / int4 / int8 path cannot equal a float32 reference's on every
machine: where the reference's top two logits are closer than the path's rounding error, the
CPU's kernels (AVX-512 or AVX2 code, AMX, the thread count) decide which one wins, and after the
first flip the two continuations share nothing. Two checks that hold on any machine instead:

- teacher forcing: score one fixed token sequence with both models (every position conditioned on
  the same prefix) and compare position by position: the reference's next token is within our
  top-k, and the logits are close (cosine similarity, max |difference| over the logit range);
- greedy runs that agree up to near ties: two greedy runs may part only at a step where the
  reference's own top two log-probabilities are within the tolerance; the steps before it match.

Exact token equality stays for float32 paths (tests/models/test_hf_equivalence.py and the
float32 half of tests/models/test_default_model.py).
"""

from __future__ import annotations

from collections.abc import Sequence as Seq
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from litedeploy.engine.engine import LLMEngine
from litedeploy.engine.input_builder import build_host_inputs, to_device
from litedeploy.engine.sampler import SampledToken
from litedeploy.engine.scheduler import ScheduledSequence, SchedulerOutput
from litedeploy.engine.sequence import Sequence


@torch.inference_mode()
def engine_logits(engine: LLMEngine, token_ids: Seq[int]) -> torch.Tensor:
    """float32 [len, vocab]: every position's logits from the engine's own runner and paged cache,
    the whole sequence in one prefill forward (as the perplexity bench scores a text)."""
    seq = Sequence(-1, list(token_ids), len(token_ids), max_new_tokens=1)
    block_manager = engine.block_manager
    block_manager.allocate(seq, len(token_ids))
    try:
        batch = SchedulerOutput([ScheduledSequence(seq, len(token_ids))], [])
        host = build_host_inputs(batch, block_manager.block_size)
        host.logits_indices = list(range(len(token_ids)))  # every row, not only the last
        return engine.runner.forward(to_device(host, engine.device)).float().cpu()
    finally:
        block_manager.free(seq)


@torch.inference_mode()
def hf_logits(hf_model, token_ids: Seq[int]) -> torch.Tensor:
    """float32 [len, vocab] of a transformers causal LM on one sequence."""
    return hf_model(torch.tensor([list(token_ids)])).logits[0].float().cpu()


def token_ranks(logits: torch.Tensor, token_ids: Seq[int]) -> list[int]:
    """Rank of token_ids[i] in logits[i] (0 = the argmax; ties count in the token's favour)."""
    ids = torch.tensor(list(token_ids))
    chosen = logits.gather(1, ids[:, None])
    return (logits > chosen).sum(1).tolist()


@dataclass
class Agreement:
    """Position-by-position comparison of our logits with the reference's on one sequence."""

    ranks: list[int]  # rank of the reference's next token in our logits
    cosine: torch.Tensor  # [positions] cosine similarity of the two logit vectors
    max_rel_diff: torch.Tensor  # [positions] max |ours - ref| / (ref max - ref min)

    def summary(self) -> str:
        return (f"max rank {max(self.ranks)}, min cosine {self.cosine.min():.5f}, "
                f"max |diff| / logit range {self.max_rel_diff.max():.4f}")


def compare(ours: torch.Tensor, reference: torch.Tensor, next_ids: Seq[int]) -> Agreement:
    """ours, reference: [positions, vocab] logits; next_ids: the reference's token after each."""
    assert ours.shape == reference.shape and len(next_ids) == ours.shape[0]
    ours, reference = ours.float(), reference.float()
    logit_range = reference.amax(1) - reference.amin(1)
    return Agreement(
        ranks=token_ranks(ours, next_ids),
        cosine=F.cosine_similarity(ours, reference, dim=1),
        max_rel_diff=(ours - reference).abs().amax(1) / logit_range,
    )


def assert_agrees(ours: torch.Tensor, reference: torch.Tensor, next_ids: Seq[int], *,
                  top_k: int | None, min_cosine: float, max_rel_diff: float) -> Agreement:
    """At every position: the reference's next token is in our top_k (None: not checked, e.g.
    where the next tokens are a prompt's, not the reference's picks), and the logits are close."""
    agreement = compare(ours, reference, next_ids)
    outside = [(i, rank) for i, rank in enumerate(agreement.ranks)
               if top_k is not None and rank >= top_k]
    assert not outside, f"(position, rank) outside our top {top_k}: {outside}; {agreement.summary()}"
    assert agreement.cosine.min() >= min_cosine, agreement.summary()
    assert agreement.max_rel_diff.max() <= max_rel_diff, agreement.summary()
    return agreement


def assert_greedy_agrees_up_to_near_ties(got: Seq[SampledToken], expected: Seq[SampledToken],
                                         atol: float) -> int:
    """Two greedy runs of the same request, each token with its raw logprob and the top two
    (GenerationConfig(logprobs=2)). They match token for token with logprobs within atol, up to
    a step where they part, which is allowed only if `expected`'s top two logprobs there are
    within 2 * atol (a near tie that rounding may flip) and `got` picked one of those two.
    Returns the number of steps that matched."""
    assert len(got) == len(expected)
    for step, (ours, ref) in enumerate(zip(got, expected, strict=True)):
        if ours.token_id != ref.token_id:
            (first, first_lp), (second, second_lp) = ref.top_logprobs[:2]
            assert first_lp - second_lp <= 2 * atol, (
                f"step {step}: {ours.token_id} instead of {ref.token_id}, but the reference's "
                f"top two logprobs are {first_lp - second_lp:.4f} apart (more than 2 * {atol})")
            assert ours.token_id in (first, second), f"step {step}: not one of the tied tokens"
            return step
        assert abs(ours.logprob - ref.logprob) <= atol, (
            f"step {step}: logprob {ours.logprob:.5f} vs {ref.logprob:.5f}")
    return len(got)
