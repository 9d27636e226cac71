"""Scheduler output -> the step's index lists on the host, then tensors on the device.

Everything is built in Python/numpy first (`HostStepInputs`); `to_device` then moves it with two
copies from pinned memory (`non_blocking=True`), so building a step never waits for the GPU. The
CUDA graph runner copies the same host lists into its static buffers instead.
"""

from __future__ import annotations

from dataclasses import dataclass
from itertools import pairwise

import numpy as np
import torch

from litedeploy.engine.forward_context import StepInputs
from litedeploy.engine.scheduler import SchedulerOutput

# CUDA: send the decode rows of a mixed batch to the decode kernel (see PagedKVBackend). H200,
# offline 1000 x 512/256 at batch 256: a mixed step of ~8k prompt tokens + ~225 decode rows took
# 48 ms instead of 54, one of ~300 prompt tokens + ~240 decode rows 14 ms instead of 18 (the
# prefill kernel gives each decode row a 64-query tile per head). H100, one call: 12.0k vs 13.4k
# out tok/s with it off, within that benchmark's run-to-run spread.
SPLIT_MIXED_BATCHES = True
# CUDA: block tables padded to a multiple of this many columns, and every part of the uploaded
# buffers starting 16-byte aligned. Triton specializes integer arguments (the table's row stride)
# and pointers on divisibility by 16, so without this a step whose widest table or token count
# changed parity compiled the attention / K/V store kernels again mid-run (~0.6 s each on H200).
TABLE_COLUMN_MULTIPLE = 16


@dataclass
class HostStepInputs:
    input_ids: np.ndarray       # [num_tokens] int64
    positions: np.ndarray       # [num_tokens] int64
    rope_lens: np.ndarray       # [num_tokens] int64
    slot_mapping: np.ndarray    # [num_tokens] int64
    block_tables: list[list[int]]
    context_lens: list[int]     # [batch]
    cu_seqlens_q: list[int]     # [batch + 1]
    logits_indices: list[int]   # rows that sample a token
    max_q_len: int
    max_context_len: int

    @property
    def batch_size(self) -> int:
        return len(self.context_lens)

    @property
    def num_leading_decode_rows(self) -> int:
        """Rows at the front with one query each (the scheduler puts running sequences first)."""
        cu = self.cu_seqlens_q
        count = 0
        while count < self.batch_size and cu[count + 1] - cu[count] == 1:
            count += 1
        return count

    @property
    def is_uniform_decode(self) -> bool:
        """One token per sequence and every sequence samples: the shape CUDA graphs capture."""
        return self.max_q_len == 1 and len(self.logits_indices) == self.batch_size


def build_host_inputs(batch: SchedulerOutput, block_size: int) -> HostStepInputs:
    ids, positions, rope_lens, slots = [], [], [], []
    context_lens: list[int] = []
    cu_seqlens = [0]
    logits_indices: list[int] = []
    tables = [item.seq.block_table for item in batch.scheduled]
    for item, table in zip(batch.scheduled, tables):
        seq, start, count = item.seq, item.seq.num_computed_tokens, item.num_new_tokens
        end = start + count
        if count == 1:  # decode: plain ints, numpy's per-call overhead would dominate
            ids.append(seq.token_ids[start])
            positions.append(start)
            rope_lens.append(end)
            slots.append(table[start // block_size] * block_size + start % block_size)
        else:
            pos = np.arange(start, end, dtype=np.int64)
            ids.extend(seq.token_ids[start:end])
            positions.extend(pos.tolist())
            rope_lens.extend([end] * count)
            block_ids = np.asarray(table, dtype=np.int64)[pos // block_size]
            slots.extend((block_ids * block_size + pos % block_size).tolist())
        context_lens.append(end)
        cu_seqlens.append(cu_seqlens[-1] + count)
        if end == seq.num_tokens:  # the chunk reaches the sequence's end: it samples a token
            logits_indices.append(cu_seqlens[-1] - 1)
    return HostStepInputs(
        input_ids=np.asarray(ids, dtype=np.int64),
        positions=np.asarray(positions, dtype=np.int64),
        rope_lens=np.asarray(rope_lens, dtype=np.int64),
        slot_mapping=np.asarray(slots, dtype=np.int64),
        block_tables=tables,
        context_lens=context_lens,
        cu_seqlens_q=cu_seqlens,
        logits_indices=logits_indices,
        max_q_len=max(b - a for a, b in pairwise(cu_seqlens)),
        max_context_len=max(context_lens),
    )


def padded_tables(tables: list[list[int]], num_columns: int) -> np.ndarray:
    """[batch, num_columns] int32, unused columns 0 (never read: context_lens bounds the reads)."""
    out = np.zeros((len(tables), num_columns), dtype=np.int32)
    for row, table in enumerate(tables):
        out[row, : len(table)] = table
    return out


def _aligned_concat(parts: list[np.ndarray], align: int) -> tuple[np.ndarray, list[int]]:
    """One flat array holding the parts, each starting at a multiple of `align` elements; also
    the start offsets."""
    offsets, total = [], 0
    for part in parts:
        offsets.append(total)
        total += -(-len(part) // align) * align
    out = np.zeros(total, dtype=parts[0].dtype)
    for offset, part in zip(offsets, parts):
        out[offset: offset + len(part)] = part
    return out, offsets


def _upload(array: np.ndarray, device: torch.device) -> torch.Tensor:
    tensor = torch.from_numpy(array)
    if device.type == "cuda":
        return tensor.pin_memory().to(device, non_blocking=True)
    return tensor.to(device)


def to_device(host: HostStepInputs, device: torch.device) -> StepInputs:
    """Two host->device copies (one int64, one int32 buffer); the tensors are views of them."""
    num_tokens, batch = len(host.input_ids), host.batch_size
    num_logits = len(host.logits_indices)
    on_cuda = device.type == "cuda"
    wide_align, narrow_align = (2, 4) if on_cuda else (1, 1)  # 16 bytes of int64 / int32
    wide, wide_at = _aligned_concat([
        host.input_ids, host.positions, host.rope_lens, host.slot_mapping,
        np.asarray(host.logits_indices, dtype=np.int64),
    ], wide_align)
    wide = _upload(wide, device)
    num_columns = max(len(t) for t in host.block_tables)
    if on_cuda:
        num_columns = -(-num_columns // TABLE_COLUMN_MULTIPLE) * TABLE_COLUMN_MULTIPLE
    use_split = SPLIT_MIXED_BATCHES and on_cuda
    num_decode = host.num_leading_decode_rows if use_split else 0
    split = 0 < num_decode < batch and host.max_q_len > 1
    prefill_cu = np.asarray(host.cu_seqlens_q[num_decode:], dtype=np.int32) - num_decode
    num_prefill_cu = len(prefill_cu) if split else 0
    narrow, narrow_at = _aligned_concat([
        padded_tables(host.block_tables, num_columns).reshape(-1),
        np.asarray(host.context_lens, dtype=np.int32),
        np.asarray(host.cu_seqlens_q, dtype=np.int32),
        prefill_cu[:num_prefill_cu],
    ], narrow_align)
    narrow = _upload(narrow, device)

    def wide_part(index: int, length: int) -> torch.Tensor:
        return wide[wide_at[index]: wide_at[index] + length]

    def narrow_part(index: int, length: int) -> torch.Tensor:
        return narrow[narrow_at[index]: narrow_at[index] + length]

    inputs = StepInputs(
        input_ids=wide_part(0, num_tokens),
        positions=wide_part(1, num_tokens),
        rope_lens=wide_part(2, num_tokens),
        slot_mapping=wide_part(3, num_tokens),
        logits_indices=wide_part(4, num_logits),
        block_tables=narrow_part(0, batch * num_columns).view(batch, num_columns),
        context_lens=narrow_part(1, batch),
        cu_seqlens_q=narrow_part(2, batch + 1),
        max_q_len=host.max_q_len,
        max_context_len=host.max_context_len,
    )
    if split:
        inputs.num_decode_rows = num_decode
        inputs.decode_max_context_len = max(host.context_lens[:num_decode])
        inputs.prefill_cu_seqlens_q = narrow_part(3, num_prefill_cu)
    return inputs
