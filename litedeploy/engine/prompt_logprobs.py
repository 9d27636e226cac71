"""Prompt logprobs: what the model thought of each prompt token, for the requests that ask.

Normally only the last position of a sequence reaches the LM head. A request with
`GenerationConfig.prompt_logprobs` also keeps the hidden states of its prompt positions (the
runner returns those rows beside the sampling logits); here the LM head runs over them in chunks
of rows, its output cast to float32 before `log_softmax`, so a long prompt never holds a
`[prompt_len, vocab]` float tensor at once.

Position i predicts prompt token i + 1, so prompt token 0 has no logprob. Such requests take no
prefix-cache hits (a hit would skip positions: `Sequence.skip_prefix_cache`) and accumulate
across prefill chunks; after a preemption the positions already done are not added again.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from litedeploy.errors import RequestError

if TYPE_CHECKING:
    from litedeploy.config import GenerationConfig
    from litedeploy.engine.scheduler import SchedulerOutput

# Rows of float32 logits one chunk may hold: 64 MiB of them (~110 rows of a 150k vocabulary).
LOGIT_CHUNK_BYTES = 64 << 20


@dataclass
class PromptLogprob:
    token_id: int  # the prompt token at this position
    logprob: float  # log_softmax of the previous position's float32 logits, at token_id
    rank: int  # 1 = it was the most likely token there
    top_logprobs: list[tuple[int, float]]  # (token id, logprob), best first


@dataclass
class PromptLogprobsProgress:
    """Kept on RequestState: entries so far (index = prompt position) and whether they went out."""

    entries: list[PromptLogprob | None] = field(default_factory=lambda: [None])
    sent: bool = False


@dataclass
class _Span:
    progress: PromptLogprobsProgress
    num_top: int
    first_row: int  # row of the step's flat batch that predicts target_ids[0]
    target_ids: list[int]


def check_request(gen: GenerationConfig, vocab_size: int, tensor_parallel: bool) -> None:
    """RequestError for prompt logprobs or logit_bias settings this engine cannot honour."""
    if gen.prompt_logprobs is not None and tensor_parallel:
        raise RequestError("prompt logprobs are not supported with tensor parallelism (--tp > 1)")
    bad = [token_id for token_id in gen.logit_bias or {} if not 0 <= token_id < vocab_size]
    if bad:
        raise RequestError(f"logit_bias token ids must be in [0, {vocab_size}); got {bad[:5]}")


def plan_spans(batch: SchedulerOutput) -> list[_Span]:
    """The prompt positions this step computes whose logprobs are still missing, as row spans."""
    spans, row = [], 0
    for item in batch.scheduled:
        seq, state = item.seq, item.seq.payload
        gen = getattr(state, "gen", None)
        if gen is not None and gen.prompt_logprobs is not None:
            if state.prompt_logprobs is None:
                state.prompt_logprobs = PromptLogprobsProgress()
            progress = state.prompt_logprobs
            start = seq.num_computed_tokens
            # position p predicts token p + 1; the last prompt position predicts the first output
            first = max(start, len(progress.entries) - 1)
            end = min(start + item.num_new_tokens, seq.num_prompt_tokens - 1)
            if end > first and not progress.sent:
                targets = seq.token_ids[first + 1:end + 1]
                spans.append(_Span(progress, gen.prompt_logprobs, row + first - start, targets))
        row += item.num_new_tokens
    return spans


def run_batch(runner: Any, batch: SchedulerOutput) -> torch.Tensor:
    """`runner.run(batch)`, also filling the prompt logprobs of the rows that ask for them."""
    spans = plan_spans(batch)
    if not spans:
        return runner.run(batch)
    rows = [span.first_row + i for span in spans for i in range(len(span.target_ids))]
    logits, hidden = runner.run_keeping_rows(batch, rows)
    targets = [token_id for span in spans for token_id in span.target_ids]
    num_top = max(span.num_top for span in spans)
    entries = compute_logprobs(runner.model, hidden, targets, num_top)
    offset = 0
    for span in spans:
        for entry in entries[offset:offset + len(span.target_ids)]:
            entry.top_logprobs = entry.top_logprobs[:span.num_top]
            span.progress.entries.append(entry)
        offset += len(span.target_ids)
    return logits


@torch.inference_mode()
def compute_logprobs(model: Any, hidden: torch.Tensor, target_ids: list[int],
                     num_top: int) -> list[PromptLogprob]:
    """hidden: [n, hidden_size] final-norm states; entry i scores target_ids[i]. One host sync."""
    vocab_size = model.config.vocab_size
    chunk_rows = max(1, LOGIT_CHUNK_BYTES // (4 * vocab_size))
    targets = torch.tensor(target_ids, dtype=torch.int64).to(hidden.device)
    num_top = min(num_top, vocab_size)
    parts = []
    for start in range(0, hidden.shape[0], chunk_rows):
        # compute_logits casts the LM head's output to float32 before the softmax
        logprobs = model.compute_logits(hidden[start:start + chunk_rows]).log_softmax(dim=-1)
        chosen = logprobs.gather(1, targets[start:start + chunk_rows, None])  # [c, 1]
        rank = (logprobs > chosen).sum(dim=-1, keepdim=True) + 1  # [c, 1]
        top_values, top_ids = logprobs.topk(num_top, dim=-1)  # [c, num_top], best first
        # float64 holds every token id and rank exactly: one tensor, one transfer
        parts.append(torch.cat([chosen.double(), rank.double(), top_ids.double(),
                                top_values.double()], dim=1))
        del logprobs
    packed = torch.cat(parts).tolist()
    out = []
    for token_id, row in zip(target_ids, packed):
        top = list(zip(map(int, row[2:2 + num_top]), row[2 + num_top:]))
        out.append(PromptLogprob(token_id, row[0], int(row[1]), top))
    return out


def take_prompt_logprobs(state: Any) -> list[PromptLogprob | None] | None:
    """A request's prompt logprobs for its next output: on the first one after the prefill, and
    again on the final one (so a consumer that keeps only the final output has them)."""
    progress: PromptLogprobsProgress | None = state.prompt_logprobs
    if progress is None or len(progress.entries) < len(state.prompt_ids):
        return None
    if progress.sent and state.finish_reason is None:
        return None
    progress.sent = True
    return progress.entries
