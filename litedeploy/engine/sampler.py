"""Batched token sampler: penalties, temperature, top-k/top-p/min-p, seeded draws, logprobs.

Called once per step on the logits of the rows that must produce a token. Order of processing
(all on float32): repetition penalty -> presence/frequency penalties -> logit bias -> suppressed
ids -> (sampled rows only) temperature -> top-k -> top-p -> min-p -> exponential race. Greedy rows
take the argmax after penalties, bias and suppression, so they match HF `generate` with
`repetition_penalty`.

Logprobs are the RAW model distribution, `log_softmax(logits)` before penalties, temperature and
filters (vLLM's default "raw_logprobs"): they describe what the model thinks, not the sampler.

Host syncs: every per-row parameter is built in Python and moved once with `non_blocking=True`;
the only sync is the single `.tolist()` at the end.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from itertools import chain
from typing import Any

import numpy as np
import torch

from litedeploy import kernels
from litedeploy.config import MIN_SAMPLING_TEMPERATURE
from litedeploy.errors import RequestError

MAX_NUM_LOGPROBS = 20
_MASK64 = (1 << 64) - 1


@dataclass
class SamplingRow:
    """What one row of the logits needs: its sampling settings and the ids the penalties see."""

    greedy: bool = True  # do_sample False (lmdeploy: greedy whatever temperature/top_k say)
    temperature: float = 1.0  # below MIN_SAMPLING_TEMPERATURE (0 included) means greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style over prompt + output ids
    presence_penalty: float = 0.0  # OpenAI-style over output ids only
    frequency_penalty: float = 0.0  # OpenAI-style over output ids only
    seed: int | None = None  # with a seed the draw depends only on (seed, step), not on the batch
    step: int = 0  # number of tokens this request generated so far
    prompt_token_ids: Sequence[int] = ()
    output_token_ids: Sequence[int] = ()
    suppressed_token_ids: Sequence[int] = ()  # logit -> -inf (stop ids before min_new_tokens)
    num_logprobs: int | None = None  # None = none; 0 = chosen token only; up to 20 top ones
    grammar: Any = None  # engine.guided.GuidedMatcher: only the tokens it allows may follow
    logit_bias: Sequence[tuple[int, float]] = ()  # (token id, added to its logit), OpenAI's

    def __post_init__(self) -> None:
        if self.num_logprobs is not None and not 0 <= self.num_logprobs <= MAX_NUM_LOGPROBS:
            raise RequestError(
                f"logprobs must be between 0 and {MAX_NUM_LOGPROBS}, got {self.num_logprobs}"
            )
        if self.temperature < 0:
            raise RequestError(f"temperature must be >= 0, got {self.temperature}")
        if self.top_k < 0:
            raise RequestError(f"top_k must be >= 0 (0 = off), got {self.top_k}")
        if not 0.0 <= self.top_p <= 1.0:
            raise RequestError(f"top_p must be in [0, 1], got {self.top_p}")
        if not 0.0 <= self.min_p <= 1.0:
            raise RequestError(f"min_p must be in [0, 1], got {self.min_p}")
        if self.repetition_penalty <= 0:
            raise RequestError(f"repetition_penalty must be > 0, got {self.repetition_penalty}")

    @property
    def is_greedy(self) -> bool:
        return self.greedy or self.temperature < MIN_SAMPLING_TEMPERATURE

    @property
    def has_penalties(self) -> bool:
        return (
            self.repetition_penalty != 1.0
            or self.presence_penalty != 0.0
            or self.frequency_penalty != 0.0
        )


@dataclass
class SampledToken:
    token_id: int
    logprob: float | None = None  # raw log_softmax(logits) of the chosen token
    top_logprobs: list[tuple[int, float]] | None = None  # best first, (token_id, raw logprob)


def row_seed(seed: int, step: int) -> int:
    """A 63-bit generator seed that depends only on (seed, step), well mixed (splitmix64)."""
    return _splitmix64(_splitmix64(seed & _MASK64) ^ (step & _MASK64)) >> 1


def _splitmix64(x: int) -> int:
    x = (x + 0x9E3779B97F4A7C15) & _MASK64
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & _MASK64
    return x ^ (x >> 31)


def _to_device(values: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Move a host tensor built from Python lists without blocking the host."""
    if device.type == "cpu":
        return values
    if device.type == "cuda":
        values = values.pin_memory()
    return values.to(device, non_blocking=True)


def _flat_index(
    id_lists: Sequence[Sequence[Sequence[int]]],
    row_indices: Sequence[int],
    vocab_size: int,
    device: torch.device,
) -> torch.Tensor:
    """Index into scores.view(-1) of every id of every listed row (one or more id lists a row).

    numpy turns the Python ints into one array about 5x faster than torch.tensor, and a flat
    index lets index_fill_/index_add_ write without the host sync of `scores[rows, ids] = x`.
    """
    lengths = np.fromiter((sum(map(len, lists)) for lists in id_lists), np.int64, len(id_lists))
    all_ids = chain.from_iterable(chain.from_iterable(lists) for lists in id_lists)
    ids = np.fromiter(all_ids, np.int64, int(lengths.sum()))
    if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
        raise RequestError(
            f"token ids for penalties or suppression must be in [0, {vocab_size}); "
            f"got {ids.min()}..{ids.max()}"
        )
    flat = np.repeat(np.asarray(row_indices, np.int64) * vocab_size, lengths) + ids
    return _to_device(torch.from_numpy(flat), device)


def apply_penalties(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Repetition (HF), then presence/frequency (OpenAI) penalties. scores: [num_rows, vocab]."""
    device, vocab_size = scores.device, scores.shape[-1]
    rep_rows = [i for i, r in enumerate(rows) if r.repetition_penalty != 1.0]
    if rep_rows:
        id_lists = [(rows[i].prompt_token_ids, rows[i].output_token_ids) for i in rep_rows]
        flat = _flat_index(id_lists, rep_rows, vocab_size, device)
        seen = torch.zeros(scores.numel(), dtype=torch.bool, device=device)
        seen = seen.index_fill_(0, flat, True).view_as(scores)
        penalty = _to_device(torch.tensor([r.repetition_penalty for r in rows]), device)[:, None]
        # same expression as HF RepetitionPenaltyLogitsProcessor: push seen ids toward "less likely"
        penalized = torch.where(scores < 0, scores * penalty, scores / penalty)
        scores = torch.where(seen, penalized, scores)
    count_rows = [
        i for i, r in enumerate(rows) if r.presence_penalty != 0.0 or r.frequency_penalty != 0.0
    ]
    if count_rows:
        id_lists = [(rows[i].output_token_ids,) for i in count_rows]
        flat = _flat_index(id_lists, count_rows, vocab_size, device)
        counts = torch.zeros(scores.numel(), dtype=scores.dtype, device=device)
        ones = torch.ones(flat.shape, dtype=scores.dtype, device=device)
        counts = counts.index_add_(0, flat, ones).view_as(scores)  # exact: small integer sums
        coeffs = torch.tensor([[r.frequency_penalty, r.presence_penalty] for r in rows])
        coeffs = _to_device(coeffs, device)  # [num_rows, 2]
        scores = scores - coeffs[:, :1] * counts - coeffs[:, 1:] * (counts > 0).to(scores.dtype)
    return scores


def apply_logit_bias(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Add each row's logit_bias to its scores, in place. scores: contiguous [num_rows, vocab]."""
    rows_with = [i for i, r in enumerate(rows) if r.logit_bias]
    if rows_with:
        id_lists = [([token_id for token_id, _ in rows[i].logit_bias],) for i in rows_with]
        flat = _flat_index(id_lists, rows_with, scores.shape[-1], scores.device)
        biases = [bias for i in rows_with for _, bias in rows[i].logit_bias]
        values = _to_device(torch.tensor(biases, dtype=scores.dtype), scores.device)
        scores.view(-1).index_add_(0, flat, values)
    return scores


def apply_suppression(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Set each row's suppressed ids to -inf, in place. scores: contiguous [num_rows, vocab]."""
    rows_with = [i for i, r in enumerate(rows) if r.suppressed_token_ids]
    if rows_with:
        id_lists = [(rows[i].suppressed_token_ids,) for i in rows_with]
        flat = _flat_index(id_lists, rows_with, scores.shape[-1], scores.device)
        scores.view(-1).index_fill_(0, flat, float("-inf"))
    return scores


def apply_top_k_top_p(
    scores: torch.Tensor, top_k: torch.Tensor, top_p_threshold: torch.Tensor
) -> torch.Tensor:
    """HF TopK then TopP semantics with per-row settings, one sort for the whole batch.

    scores: [n, vocab]; top_k: [n] long, 0 = off; top_p_threshold: [n] float = 1 - top_p, or < 0
    to keep every token (top_p == 1).
    """
    vocab_size = scores.shape[-1]
    sorted_scores, sorted_ids = scores.sort(dim=-1, descending=True)  # [n, vocab]
    k = torch.where(top_k > 0, top_k.clamp(max=vocab_size), vocab_size)  # [n]
    kth_score = sorted_scores.gather(1, (k - 1)[:, None])  # [n, 1]
    # like HF: drop what is strictly below the k-th score, so ties with it stay
    sorted_scores = sorted_scores.masked_fill(sorted_scores < kth_score, float("-inf"))
    probs = sorted_scores.softmax(dim=-1)
    # HF sums from the smallest probability up and drops while the sum stays <= 1 - top_p
    mass_from_smallest = probs.flip(-1).cumsum(dim=-1).flip(-1)  # [n, vocab]
    remove = mass_from_smallest <= top_p_threshold[:, None]
    remove[:, 0] = False  # always keep the best token
    sorted_scores = sorted_scores.masked_fill(remove, float("-inf"))
    return torch.empty_like(scores).scatter_(1, sorted_ids, sorted_scores)


def apply_min_p(scores: torch.Tensor, min_p: torch.Tensor) -> torch.Tensor:
    """HF MinP: drop tokens whose probability is below min_p times the best one. min_p: [n]."""
    probs = scores.softmax(dim=-1)
    threshold = min_p[:, None] * probs.amax(dim=-1, keepdim=True)  # [n, 1]
    return scores.masked_fill(probs < threshold, float("-inf"))


def process_sampled_logits(scores: torch.Tensor, rows: Sequence[SamplingRow]) -> torch.Tensor:
    """Temperature -> top-k -> top-p -> min-p on float32 scores [n, vocab]; dropped ids -> -inf."""
    params = torch.tensor(
        [[r.temperature, r.top_k, 1.0 - r.top_p if r.top_p < 1.0 else -1.0, r.min_p] for r in rows],
        dtype=torch.float32,
    )
    params = _to_device(params, scores.device)  # [n, 4]: one transfer for all settings
    # like HF TemperatureLogitsWarper; greedy rows (temperature < 1e-5) never get here
    scores = scores / params[:, 0:1]
    if any(r.top_k > 0 or r.top_p < 1.0 for r in rows):
        scores = apply_top_k_top_p(scores, params[:, 1].long(), params[:, 2])
    if any(r.min_p > 0.0 for r in rows):
        scores = apply_min_p(scores, params[:, 3])
    return scores


class Sampler:
    """Turns one step's logits into one token per row (see the module docstring)."""

    def __init__(self, device: torch.device | str = "cpu") -> None:
        self.device = torch.device(device)
        self._seeded_generators: dict[torch.device, torch.Generator] = {}
        self._generator(self.device)  # made once; seeded rows re-seed it per row and step

    def __call__(self, logits: torch.Tensor, rows: list[SamplingRow]) -> list[SampledToken]:
        if logits.dim() != 2 or logits.shape[0] != len(rows):
            raise ValueError(
                f"logits must be [num_rows, vocab] with one row per SamplingRow; got shape "
                f"{tuple(logits.shape)} for {len(rows)} rows"
            )
        if not rows:
            return []
        scores = logits
        if any(r.has_penalties or r.suppressed_token_ids or r.logit_bias for r in rows):
            scores = apply_penalties(logits.to(torch.float32, copy=True), rows)
            scores = apply_logit_bias(scores, rows)
            scores = apply_suppression(scores, rows)
        if any(r.grammar is not None for r in rows):  # structured output: last word on the ids
            from litedeploy.engine.guided.matcher import mask_grammar_rows

            # the raw logits are only needed again for logprobs: else mask them in place
            raw_needed = any(r.num_logprobs is not None for r in rows)
            scores = mask_grammar_rows(scores, rows, copy=scores is logits and raw_needed)
        sampled_rows = [i for i, r in enumerate(rows) if not r.is_greedy]
        if not sampled_rows:
            # ties -> lowest id; CUDA: two short Triton launches (multi-step bursts' argmax)
            return self._finish(logits, rows, kernels.argmax_rows(scores))
        sampled_ids = self._sample(scores, [rows[i] for i in sampled_rows], sampled_rows)
        if len(sampled_rows) == len(rows):
            return self._finish(logits, rows, sampled_ids)
        index = _to_device(torch.tensor(sampled_rows), logits.device)
        token_ids = kernels.argmax_rows(scores).index_copy(0, index, sampled_ids)  # [num_rows]
        return self._finish(logits, rows, token_ids)

    def _sample(
        self, scores: torch.Tensor, rows: list[SamplingRow], row_indices: list[int]
    ) -> torch.Tensor:
        """Exponential race over the processed distribution of the sampled rows -> [n] ids."""
        if len(row_indices) == scores.shape[0]:
            scores = scores.to(torch.float32, copy=True)
        else:
            index = _to_device(torch.tensor(row_indices), scores.device)
            scores = scores.index_select(0, index).to(torch.float32)
        probs = process_sampled_logits(scores, rows).softmax(dim=-1)
        # argmax(p / q) with q ~ Exp(1) draws from p with no host sync (gpt-fast, vLLM)
        race = probs.div_(self._exponential(rows, probs.shape, scores.device))
        return race.argmax(dim=-1)

    def _exponential(
        self, rows: list[SamplingRow], shape: torch.Size, device: torch.device
    ) -> torch.Tensor:
        """Exp(1) noise [n, vocab]: per-row seeded generators where asked, else the global one."""
        noise = torch.empty(shape, dtype=torch.float32, device=device)
        if any(r.seed is None for r in rows):
            noise.exponential_()
        for i, row in enumerate(rows):
            if row.seed is not None:
                generator = self._generator(device)
                generator.manual_seed(row_seed(row.seed, row.step))
                noise[i].exponential_(generator=generator)
        # exponential_ may return exactly 0 in rare cases; p / 0 would be inf or nan
        return noise.clamp_(min=torch.finfo(torch.float32).tiny)

    def _generator(self, device: torch.device) -> torch.Generator:
        if device not in self._seeded_generators:
            self._seeded_generators[device] = torch.Generator(device=device)
        return self._seeded_generators[device]

    def _finish(
        self, logits: torch.Tensor, rows: list[SamplingRow], token_ids: torch.Tensor
    ) -> list[SampledToken]:
        """Gather raw logprobs where asked and bring everything to the host in one transfer."""
        lp_rows = [i for i, r in enumerate(rows) if r.num_logprobs is not None]
        if not lp_rows:
            return [SampledToken(token_id=t) for t in token_ids.tolist()]
        num_rows, num_lp_rows = len(rows), len(lp_rows)
        index = _to_device(torch.tensor(lp_rows), logits.device)
        raw = logits.index_select(0, index).float().log_softmax(dim=-1)  # [m, vocab]
        chosen = raw.gather(1, token_ids.index_select(0, index)[:, None])  # [m, 1]
        top_n = min(max(rows[i].num_logprobs for i in lp_rows), raw.shape[-1])
        top_values, top_ids = raw.topk(top_n, dim=-1)  # [m, top_n], best first
        # float64 holds every token id exactly, so one tensor carries ids and logprobs
        packed = torch.cat(
            [
                token_ids.double(),
                chosen.double().flatten(),
                top_ids.double().flatten(),
                top_values.double().flatten(),
            ]
        ).tolist()
        ids = [int(t) for t in packed[:num_rows]]
        out = [SampledToken(token_id=t) for t in ids]
        top_start = num_rows + num_lp_rows
        values_start = top_start + num_lp_rows * top_n
        for j, i in enumerate(lp_rows):
            out[i].logprob = packed[num_rows + j]
            n = rows[i].num_logprobs
            base = j * top_n
            out[i].top_logprobs = [
                (int(packed[top_start + base + c]), packed[values_start + base + c])
                for c in range(n)
            ]
        return out
