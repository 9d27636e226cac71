"""Scheduler output -> the step's index tensors, built in Python and moved to the device once."""

from __future__ import annotations

import torch

from litedeploy.engine.forward_context import StepInputs
from litedeploy.engine.scheduler import SchedulerOutput
from litedeploy.kernels.reference import paged_attention_mask


def build_step_inputs(batch: SchedulerOutput, block_size: int, device: torch.device) -> StepInputs:
    input_ids: list[int] = []
    positions: list[int] = []
    rope_lens: list[int] = []
    slots: list[int] = []
    context_lens: list[int] = []
    cu_seqlens = [0]
    logits_indices: list[int] = []
    tables = [item.seq.block_table for item in batch.scheduled]
    max_blocks = max(len(t) for t in tables)
    for item in batch.scheduled:
        seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        end = start + count
        input_ids.extend(seq.token_ids[start:end])
        positions.extend(range(start, end))
        rope_lens.extend([end] * count)
        table = seq.block_table
        slots.extend(table[p // block_size] * block_size + p % block_size for p in range(start, end))
        context_lens.append(end)
        cu_seqlens.append(cu_seqlens[-1] + count)
        if end == seq.num_tokens:  # the chunk reaches the sequence's end: it samples a token
            logits_indices.append(cu_seqlens[-1] - 1)
    padded_tables = [t + [0] * (max_blocks - len(t)) for t in tables]

    def to_device(values, dtype=torch.int64) -> torch.Tensor:
        tensor = torch.tensor(values, dtype=dtype)
        if device.type == "cuda":
            return tensor.pin_memory().to(device, non_blocking=True)
        return tensor

    q_lens = [b - a for a, b in zip(cu_seqlens, cu_seqlens[1:])]
    inputs = StepInputs(
        input_ids=to_device(input_ids),
        positions=to_device(positions),
        rope_lens=to_device(rope_lens),
        slot_mapping=to_device(slots),
        block_tables=to_device(padded_tables, torch.int32),
        context_lens=to_device(context_lens, torch.int32),
        cu_seqlens_q=to_device(cu_seqlens, torch.int32),
        logits_indices=to_device(logits_indices),
        max_q_len=max(q_lens),
        max_context_len=max(context_lens),
    )
    if device.type != "cuda":
        inputs.mask = paged_attention_mask(
            torch.tensor(q_lens), inputs.context_lens, inputs.max_q_len, inputs.max_context_len
        )
    return inputs
