"""Multi-step decoding: several greedy decode steps between two host syncs.

At batch 1 a decode step of a 1.8B model takes ~2 ms on the GPU, and the host's share of a step
(building inputs, the sampler's `.tolist()`, detokenizing, scheduling) leaves the GPU idle for a
further ~0.35 ms. When every row of a decode batch takes the argmax and nothing needs the
host between steps, the next step's inputs follow from the current ones on the device: the
sampled token becomes the input, positions and context lengths grow by one and the slot comes
from the block table, which already holds blocks for all the steps. So the engine runs up to
`num_scheduler_steps` steps back to back and syncs once (vLLM's multi-step scheduling).

A sequence that stops inside a burst (stop token, stop string) just drops the tokens that follow:
their K/V went to slots of its own blocks past its end, which are freed with it. New requests wait
for the burst to end, so bursts run only while nobody waits or the batch is full.
"""

from __future__ import annotations

import torch

from litedeploy import kernels
from litedeploy.engine.forward_context import StepInputs
from litedeploy.engine.sampler import SamplingRow

DEFAULT_CUDA_STEPS = 8


def resolve_num_steps(configured: int | None, device: torch.device) -> int:
    if configured is not None:
        return configured
    return DEFAULT_CUDA_STEPS if device.type == "cuda" else 1


def row_can_burst(row: SamplingRow) -> bool:
    """Rows whose next token is a plain argmax of the logits: computable on the device."""
    return (row.is_greedy and not row.has_penalties and not row.suppressed_token_ids
            and row.num_logprobs is None and not row.logit_bias
            and row.grammar is None)  # a grammar's mask needs the host between tokens


def greedy_next(logits: torch.Tensor) -> torch.Tensor:
    """The sampler's greedy choice (argmax, ties -> lowest id) as int64 [rows]."""
    return kernels.argmax_rows(logits)


def advance_decode_inputs(inputs: StepInputs, next_tokens: torch.Tensor, block_size: int) -> None:
    """Turn a one-token-per-row decode step's inputs into the next step's, in place, on device.

    Rows with context length 0 are padding (CUDA graph batches): they keep position 0, slot -1
    and context 0, so they still read and write nothing. No host sync, so it can be captured.
    """
    valid = inputs.context_lens > 0
    valid64 = valid.to(torch.int64)
    inputs.input_ids.copy_(torch.where(valid, next_tokens, 0))
    inputs.positions.add_(valid64)
    inputs.rope_lens.add_(valid64)
    inputs.context_lens.add_(valid.to(inputs.context_lens.dtype))
    positions = inputs.positions
    # clamped: after a burst's last step the next position may lie past the table (its
    # slot is never used, but a gather out of bounds would fault on the device)
    last_column = inputs.block_tables.shape[1] - 1
    column = (positions // block_size).clamp(max=last_column).to(torch.int64).unsqueeze(1)
    block_ids = inputs.block_tables.gather(1, column).squeeze(1).to(torch.int64)
    slots = block_ids * block_size + positions % block_size
    inputs.slot_mapping.copy_(torch.where(valid, slots, -1))
