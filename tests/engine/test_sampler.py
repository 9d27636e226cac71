"""Sampler: greedy/sampled batches, seeds, distributions, logprobs, penalties, HF as the reference."""

from __future__ import annotations

import math

import pytest
import torch
from transformers.generation.logits_process import (
    MinPLogitsWarper,
    RepetitionPenaltyLogitsProcessor,
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

from litedeploy.engine.sampler import (
    SampledToken,
    Sampler,
    SamplingRow,
    apply_min_p,
    apply_penalties,
    apply_suppression,
    apply_top_k_top_p,
    process_sampled_logits,
)

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def _random_logits(num_rows: int, vocab_size: int, seed: int, device: str = "cpu") -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    return (torch.randn(num_rows, vocab_size, generator=generator) * 3).to(device)


def _ids(tokens: list[SampledToken]) -> list[int]:
    return [t.token_id for t in tokens]


def _chi2_critical(dof: int) -> float:
    """Chi-square quantile at p = 0.001 (Wilson-Hilferty approximation, no scipy needed)."""
    z = 3.09
    return dof * (1 - 2 / (9 * dof) + z * math.sqrt(2 / (9 * dof))) ** 3


# ---------------------------------------------------------------- greedy


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_all_greedy_defaults_is_plain_argmax(device: str, dtype: torch.dtype) -> None:
    logits = _random_logits(7, 1000, seed=0, device=device).to(dtype)
    tokens = Sampler(device)(logits, [SamplingRow() for _ in range(7)])
    assert _ids(tokens) == logits.argmax(dim=-1).tolist()
    assert all(t.logprob is None and t.top_logprobs is None for t in tokens)


def test_greedy_ties_go_to_lowest_id() -> None:
    logits = torch.tensor([[0.0, 5.0, 1.0, 5.0], [2.0, 2.0, 2.0, 2.0]])
    assert _ids(Sampler()(logits, [SamplingRow(), SamplingRow()])) == [1, 0]


def test_greedy_ignores_temperature_and_top_k() -> None:
    logits = _random_logits(4, 100, seed=1)
    rows = [SamplingRow(greedy=True, temperature=1.5, top_k=40, top_p=0.5) for _ in range(4)]
    assert _ids(Sampler()(logits, rows)) == logits.argmax(dim=-1).tolist()


@pytest.mark.parametrize("device", DEVICES)
def test_mixed_batch_greedy_rows_are_argmax(device: str) -> None:
    logits = _random_logits(8, 500, seed=2, device=device)
    rows = [
        SamplingRow() if i % 2 == 0 else SamplingRow(greedy=False, temperature=2.0, seed=i)
        for i in range(8)
    ]
    tokens = _ids(Sampler(device)(logits, rows))
    argmax = logits.argmax(dim=-1).tolist()
    assert [tokens[i] for i in range(0, 8, 2)] == [argmax[i] for i in range(0, 8, 2)]
    # flat-ish logits at T=2: at least one sampled row must leave the argmax
    assert any(tokens[i] != argmax[i] for i in range(1, 8, 2))


def test_temperature_zero_on_a_sampled_row_is_greedy() -> None:
    logits = _random_logits(3, 200, seed=3)
    rows = [SamplingRow(greedy=False, temperature=0.0) for _ in range(3)]
    assert _ids(Sampler()(logits, rows)) == logits.argmax(dim=-1).tolist()


def test_top_k_one_equals_greedy() -> None:
    logits = _random_logits(64, 300, seed=4)
    rows = [SamplingRow(greedy=False, temperature=1.3, top_k=1, seed=i) for i in range(64)]
    assert _ids(Sampler()(logits, rows)) == logits.argmax(dim=-1).tolist()


# ---------------------------------------------------------------- seeds


@pytest.mark.parametrize("device", DEVICES)
def test_seeded_rows_do_not_depend_on_the_batch(device: str) -> None:
    vocab_size = 64
    target = torch.zeros(1, vocab_size, device=device)  # uniform: the draw is all noise
    sampler = Sampler(device)

    def draw(seed: int, step: int) -> int:
        row = SamplingRow(greedy=False, seed=seed, step=step, top_p=0.95)
        return sampler(target, [row])[0].token_id

    alone = [draw(seed, step=3) for seed in range(20)]
    others = _random_logits(5, vocab_size, seed=5, device=device)
    for position in (0, 2, 5):
        for seed in range(20):
            logits = torch.cat([others[:position], target, others[position:]])
            rows = [SamplingRow(greedy=False, temperature=0.9) for _ in range(5)]
            rows.insert(position, SamplingRow(greedy=False, seed=seed, step=3, top_p=0.95))
            rows[1 if position != 1 else 0] = SamplingRow(greedy=False, seed=99, top_k=5)
            assert sampler(logits, rows)[position].token_id == alone[seed]
    assert [draw(seed, step=3) for seed in range(20)] == alone  # reproducible
    assert len(set(alone)) > 5  # different seeds draw different tokens
    assert [draw(7, step) for step in range(20)] != [draw(7, 3)] * 20  # steps differ too


def test_unseeded_rows_follow_the_global_generator() -> None:
    logits = torch.zeros(16, 1000)
    rows = [SamplingRow(greedy=False) for _ in range(16)]
    torch.manual_seed(123)
    first = _ids(Sampler()(logits, rows))
    torch.manual_seed(123)
    assert _ids(Sampler()(logits, rows)) == first
    assert _ids(Sampler()(logits, rows)) != first


# ---------------------------------------------------------------- distribution


def _expected_probs(
    logits: list[float], temperature: float, top_k: int, top_p: float, min_p: float
) -> list[float]:
    """The target distribution written out by hand, token by token."""
    weights = [math.exp(x / temperature) for x in logits]
    order = sorted(range(len(logits)), key=lambda i: -logits[i])
    keep = set(order[:top_k] if top_k > 0 else order)
    if top_p < 1.0:
        mass = sum(weights[i] for i in keep)
        kept_order = [i for i in order if i in keep]
        keep = set()
        for rank, i in enumerate(kept_order):
            # HF: drop a token when it and every smaller one together weigh <= 1 - top_p
            tail = sum(weights[j] for j in kept_order[rank:]) / mass
            if rank == 0 or tail > 1 - top_p:
                keep.add(i)
    best = max(weights[i] for i in keep)
    keep = {i for i in keep if weights[i] >= min_p * best}
    mass = sum(weights[i] for i in keep)
    return [weights[i] / mass if i in keep else 0.0 for i in range(len(logits))]


def _check_counts(counts: list[int], expected: list[float]) -> None:
    total = sum(counts)
    for count, p in zip(counts, expected, strict=True):
        if p == 0.0:
            assert count == 0
    kept = [(c, p * total) for c, p in zip(counts, expected, strict=True) if p > 0]
    chi2 = sum((c - e) ** 2 / e for c, e in kept)
    assert chi2 < _chi2_critical(max(len(kept) - 1, 1)), (counts, expected)


SETTINGS = [  # temperature, top_k, top_p, min_p
    (1.0, 0, 1.0, 0.0),
    (0.7, 5, 1.0, 0.0),
    (1.0, 0, 0.8, 0.0),
    (1.3, 6, 0.9, 0.0),
    (1.0, 0, 1.0, 0.15),
]
LOGITS = [2.0, 1.5, 1.0, 0.5, 0.0, -0.5, -1.0, 2.5]


@pytest.mark.parametrize(("temperature", "top_k", "top_p", "min_p"), SETTINGS)
def test_global_draws_follow_the_processed_softmax(temperature, top_k, top_p, min_p) -> None:
    num_draws = 20000
    row = SamplingRow(greedy=False, temperature=temperature, top_k=top_k, top_p=top_p, min_p=min_p)
    torch.manual_seed(0)
    tokens = _ids(Sampler()(torch.tensor([LOGITS]).expand(num_draws, -1), [row] * num_draws))
    counts = [tokens.count(i) for i in range(len(LOGITS))]
    _check_counts(counts, _expected_probs(LOGITS, temperature, top_k, top_p, min_p))


def test_seeded_draws_follow_the_processed_softmax() -> None:
    num_draws = 4000
    rows = [
        SamplingRow(greedy=False, temperature=0.8, top_k=6, top_p=0.95, seed=s, step=11)
        for s in range(num_draws)
    ]
    tokens = _ids(Sampler()(torch.tensor([LOGITS]).expand(num_draws, -1), rows))
    counts = [tokens.count(i) for i in range(len(LOGITS))]
    _check_counts(counts, _expected_probs(LOGITS, 0.8, 6, 0.95, 0.0))


# ---------------------------------------------------------------- suppression


def test_suppressed_ids_are_never_drawn() -> None:
    logits = torch.tensor([[5.0, 4.0, 0.0, 0.0, 0.0, 0.0]]).expand(3000, -1)
    sampled = SamplingRow(greedy=False, suppressed_token_ids=(0, 2))
    rows = [sampled] * 2999 + [SamplingRow(suppressed_token_ids=(0,))]
    torch.manual_seed(1)
    tokens = _ids(Sampler()(logits, rows))
    assert 0 not in tokens[:-1] and 2 not in tokens[:-1]
    assert {3, 4, 5} <= set(tokens[:-1])  # the others still appear
    assert tokens[-1] == 1  # greedy falls to the next best


# ---------------------------------------------------------------- logprobs


@pytest.mark.parametrize("device", DEVICES)
def test_logprobs_are_the_raw_log_softmax(device: str) -> None:
    logits = _random_logits(4, 300, seed=6, device=device).to(torch.bfloat16)
    rows = [
        SamplingRow(num_logprobs=5),
        SamplingRow(
            greedy=False,
            temperature=0.5,
            repetition_penalty=1.3,
            output_token_ids=(1, 2),
            num_logprobs=20,
            seed=3,
        ),
        SamplingRow(),
        SamplingRow(num_logprobs=0, frequency_penalty=0.5, output_token_ids=(7,)),
    ]
    tokens = Sampler(device)(logits, rows)
    raw = logits.float().log_softmax(dim=-1).cpu()
    for i in (0, 1, 3):
        assert tokens[i].logprob == pytest.approx(raw[i, tokens[i].token_id].item(), abs=1e-5)
    assert tokens[2].logprob is None and tokens[2].top_logprobs is None
    assert tokens[3].top_logprobs == []
    for i, n in ((0, 5), (1, 20)):
        top = tokens[i].top_logprobs
        assert len(top) == n
        values = [v for _, v in top]
        assert values == sorted(values, reverse=True)
        assert values[0] == pytest.approx(raw[i].max().item(), abs=1e-5)
        for token_id, value in top:
            assert value == pytest.approx(raw[i, token_id].item(), abs=1e-5)
    assert tokens[0].top_logprobs[0][0] == tokens[0].token_id  # greedy: chosen is the best


def test_too_many_logprobs_is_a_value_error() -> None:
    SamplingRow(num_logprobs=20)
    with pytest.raises(ValueError, match="logprobs"):
        SamplingRow(num_logprobs=21)


@pytest.mark.parametrize(
    "bad",
    [
        {"top_p": 1.5},
        {"top_k": -1},
        {"min_p": -0.1},
        {"temperature": -1.0},
        {"repetition_penalty": 0.0},
        {"num_logprobs": -1},
    ],
)
def test_bad_settings_are_value_errors(bad: dict) -> None:
    with pytest.raises(ValueError):
        SamplingRow(**bad)


def test_logits_shape_must_match_rows() -> None:
    with pytest.raises(ValueError, match="one row per SamplingRow"):
        Sampler()(torch.zeros(2, 10), [SamplingRow()])


# ---------------------------------------------------------------- penalties


def test_penalties_by_hand() -> None:
    logits = torch.tensor([[2.0, -1.0, 0.5, 3.0, 1.0], [2.0, -1.0, 0.5, 3.0, 1.0]])
    rows = [
        SamplingRow(
            repetition_penalty=2.0,
            presence_penalty=0.5,
            frequency_penalty=0.25,
            prompt_token_ids=(0,),
            output_token_ids=(1, 1, 3),
        ),
        # presence/frequency see only the output: prompt token 0 stays untouched
        SamplingRow(presence_penalty=1.0, prompt_token_ids=(0,), output_token_ids=(4,)),
    ]
    # row 0: rep: 2/2=1, -1*2=-2, 3/2=1.5; then -0.25*count - 0.5*present on 1 (x2) and 3 (x1)
    expected = torch.tensor([[1.0, -3.0, 0.5, 0.75, 1.0], [2.0, -1.0, 0.5, 3.0, 0.0]])
    assert torch.equal(apply_penalties(logits.clone(), rows), expected)
    # greedy sees the penalties: 3 -> tie of 0 and 4 at 1.0 -> lowest id
    assert _ids(Sampler()(logits, rows)) == [0, 3]
    assert torch.equal(logits[0], torch.tensor([2.0, -1.0, 0.5, 3.0, 1.0]))  # input untouched


def test_suppression_by_hand() -> None:
    scores = apply_suppression(
        torch.zeros(2, 4), [SamplingRow(suppressed_token_ids=(1, 3)), SamplingRow()]
    )
    inf = float("-inf")
    assert torch.equal(scores, torch.tensor([[0.0, inf, 0.0, inf], [0.0, 0.0, 0.0, 0.0]]))


# ---------------------------------------------------------------- transformers as reference


def _assert_same_kept_and_values(ours: torch.Tensor, theirs: torch.Tensor) -> None:
    kept = torch.isfinite(theirs)
    assert torch.equal(torch.isfinite(ours), kept)
    torch.testing.assert_close(ours[kept], theirs[kept], rtol=1e-6, atol=1e-6)


def test_repetition_penalty_matches_transformers() -> None:
    logits = _random_logits(4, 50, seed=7)
    generator = torch.Generator().manual_seed(8)
    rows, prompts = [], []
    for i, penalty in enumerate((1.2, 0.8, 1.0, 2.5)):
        prompt = torch.randint(0, 50, (12,), generator=generator).tolist()
        output = torch.randint(0, 50, (5,), generator=generator).tolist()
        rows.append(
            SamplingRow(
                repetition_penalty=penalty, prompt_token_ids=prompt, output_token_ids=output
            )
        )
        prompts.append(prompt + output)
    ours = apply_penalties(logits.clone(), rows)
    for i, row in enumerate(rows):
        hf = RepetitionPenaltyLogitsProcessor(row.repetition_penalty)
        theirs = hf(torch.tensor([prompts[i]]), logits[i : i + 1].clone())
        torch.testing.assert_close(ours[i : i + 1], theirs, rtol=0, atol=0)


HF_ROWS = [  # temperature, top_k, top_p, min_p
    (0.7, 0, 1.0, 0.0),
    (1.0, 10, 1.0, 0.0),
    (1.0, 0, 0.9, 0.0),
    (1.0, 0, 1.0, 0.1),
    (0.6, 20, 0.85, 0.05),
    (1.4, 3, 0.5, 0.2),
    (1.0, 60, 0.3, 0.0),  # top_k above the vocab size
]


def _hf_chain(
    scores: torch.Tensor, temperature: float, top_k: int, top_p: float, min_p: float
) -> torch.Tensor:
    scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    if min_p > 0.0:
        scores = MinPLogitsWarper(min_p)(None, scores)
    return scores


def test_each_warper_matches_transformers() -> None:
    logits = _random_logits(len(HF_ROWS), 50, seed=9)
    top_k = torch.tensor([k for _, k, _, _ in HF_ROWS])
    threshold = torch.tensor([1 - p if p < 1 else -1.0 for _, _, p, _ in HF_ROWS])
    ours_top_k = apply_top_k_top_p(logits, top_k, torch.full_like(threshold, -1.0))
    ours_top_p = apply_top_k_top_p(logits, torch.zeros_like(top_k), threshold)
    ours_min_p = apply_min_p(logits, torch.tensor([m for _, _, _, m in HF_ROWS]))
    for i, (_, k, p, m) in enumerate(HF_ROWS):
        row = logits[i : i + 1]
        if k > 0:
            _assert_same_kept_and_values(ours_top_k[i : i + 1], TopKLogitsWarper(k)(None, row))
        if p < 1.0:
            _assert_same_kept_and_values(ours_top_p[i : i + 1], TopPLogitsWarper(p)(None, row))
        if m > 0:
            _assert_same_kept_and_values(ours_min_p[i : i + 1], MinPLogitsWarper(m)(None, row))


def test_full_chain_matches_transformers() -> None:
    logits = _random_logits(len(HF_ROWS), 50, seed=10)
    rows = [
        SamplingRow(greedy=False, temperature=t, top_k=k, top_p=p, min_p=m)
        for t, k, p, m in HF_ROWS
    ]
    ours = process_sampled_logits(logits.clone(), rows)
    for i, settings in enumerate(HF_ROWS):
        theirs = _hf_chain(logits[i : i + 1].clone(), *settings)
        _assert_same_kept_and_values(ours[i : i + 1], theirs)


def test_threshold_edges_match_transformers() -> None:
    # uniform logits make every probability and partial sum exact, so the edges are exercised
    uniform = torch.zeros(1, 4)
    no_top_k, keep_all = torch.zeros(1, dtype=torch.long), torch.tensor([-1.0])
    for top_p, num_kept in ((0.5, 2), (0.0, 1)):
        ours = apply_top_k_top_p(uniform, no_top_k, torch.tensor([1.0 - top_p]))
        theirs = TopPLogitsWarper(top_p)(None, uniform.clone())
        assert int(torch.isfinite(ours).sum()) == int(torch.isfinite(theirs).sum()) == num_kept
    ours = apply_min_p(torch.tensor([[1.0, 1.0, 0.0, 1.0]]), torch.tensor([1.0]))
    theirs = MinPLogitsWarper(1.0)(None, torch.tensor([[1.0, 1.0, 0.0, 1.0]]))
    _assert_same_kept_and_values(ours, theirs)  # the tied best ones survive min_p = 1
    ties = apply_top_k_top_p(torch.tensor([[1.0, 3.0, 3.0, 2.0]]), torch.tensor([1]), keep_all)
    assert torch.isfinite(ties).tolist() == [[False, True, True, False]]  # top_k keeps ties


def test_top_p_zero_equals_greedy() -> None:
    logits = _random_logits(32, 300, seed=11)
    rows = [SamplingRow(greedy=False, temperature=1.5, top_p=0.0, seed=i) for i in range(32)]
    assert _ids(Sampler()(logits, rows)) == logits.argmax(dim=-1).tolist()


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_step_syncs_only_once(recwarn: pytest.WarningsRecorder) -> None:
    logits = _random_logits(6, 5000, seed=12, device="cuda")
    rows = [
        SamplingRow(),
        SamplingRow(repetition_penalty=1.2, prompt_token_ids=(1, 2), output_token_ids=(3,)),
        SamplingRow(greedy=False, top_k=50, top_p=0.9, min_p=0.05, seed=4, num_logprobs=3),
        SamplingRow(greedy=False, presence_penalty=0.5, output_token_ids=(9, 9)),
        SamplingRow(greedy=False, suppressed_token_ids=(0, 1), num_logprobs=0),
        SamplingRow(greedy=False, temperature=0.5, seed=8, step=2),
    ]
    sampler = Sampler("cuda")
    sampler(logits, rows)  # warm up: allocators, generators
    torch.cuda.synchronize()
    recwarn.clear()
    torch.cuda.set_sync_debug_mode("warn")
    try:
        sampler(logits, rows)
    finally:
        torch.cuda.set_sync_debug_mode("default")
    syncs = [w for w in recwarn if "called a synchronizing" in str(w.message)]
    assert len(syncs) == 1, [str(w.message) for w in syncs]  # the final .tolist()


def test_out_of_range_penalty_ids_are_value_errors() -> None:
    # a flat index would otherwise land silently in the next row
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        Sampler()(torch.zeros(2, 10), [SamplingRow(suppressed_token_ids=(12,)), SamplingRow()])
    with pytest.raises(ValueError, match=r"\[0, 10\)"):
        Sampler()(torch.zeros(1, 10), [SamplingRow(repetition_penalty=1.1, prompt_token_ids=(-1,))])
