"""Decode steps replayed from CUDA graphs: one graph per batch size of a ladder, one memory pool.

A decode step of a 1.8B model launches a few hundred small kernels; at batch 1 launching them
takes longer than running them. Capturing the step once per batch size and replaying it costs one
launch. Batches are padded up to the next captured size: padding rows have slot -1 (store_kv
writes nothing) and context length 0 (attention reads nothing and writes zeros), and their logits
are dropped. Prefill, mixed and oversized batches run eagerly.

The decode kernel's split count is derived from `max_context_len` at launch and frozen by the
capture, so graphs are captured with the longest context the engine allows (session_len); the
kernel then splits each sequence's own context into that many partitions.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import torch

from litedeploy.engine.forward_context import StepInputs
from litedeploy.engine.input_builder import HostStepInputs
from litedeploy.engine.multi_step import advance_decode_inputs, greedy_next

logger = logging.getLogger(__name__)

MAX_GRAPH_BATCH_SIZE = 256  # past this, launch overhead is negligible next to the step's work


def graph_batch_sizes(max_batch_size: int, cap: int = MAX_GRAPH_BATCH_SIZE) -> list[int]:
    """1, 2, 4, 8, then every 8 up to min(max_batch_size, cap); the top size is always in."""
    if max_batch_size < 1:
        raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
    top = min(max_batch_size, cap)
    sizes = {s for s in (1, 2, 4, 8) if s <= top} | set(range(8, top + 1, 8)) | {top}
    return sorted(sizes)


def pick_graph_batch_size(sizes: list[int], batch_size: int) -> int | None:
    """The smallest captured size that holds the batch; None when the batch is too large."""
    for size in sizes:
        if size >= batch_size:
            return size
    return None


@dataclass
class StaticLayout:
    """Where each input lives inside the two flat static buffers (int64 and int32).

    int64: [input_ids | positions | rope_lens | slot_mapping], max_batch each.
    int32: [context_lens (max_batch) | cu_seqlens (max_batch + 1) | block_tables (max_batch x M)].
    Block tables come last so a step copies only the prefix that holds its own rows.
    """

    max_batch: int
    max_blocks: int

    @property
    def wide_len(self) -> int:
        return 4 * self.max_batch

    @property
    def narrow_len(self) -> int:
        return 2 * self.max_batch + 1 + self.max_batch * self.max_blocks

    def narrow_prefix(self, batch_size: int) -> int:
        return 2 * self.max_batch + 1 + batch_size * self.max_blocks


def fill_host_buffers(host: HostStepInputs, graph_size: int, layout: StaticLayout,
                      wide: np.ndarray, narrow: np.ndarray) -> None:
    """Write one decode step padded to graph_size into the host staging arrays.

    Padding rows: token 0 at position 0, slot -1 (nothing stored), context length 0 (nothing
    read), one query each so cu_seqlens stays a plain arange past the real rows.
    """
    n, big = host.batch_size, layout.max_batch
    wide[:] = 0
    wide[: n] = host.input_ids
    wide[big: big + n] = host.positions
    wide[2 * big: 2 * big + n] = host.rope_lens
    wide[2 * big + n: 2 * big + graph_size] = 1  # dynamic NTK: any length <= max_pos is neutral
    wide[3 * big: 4 * big] = -1
    wide[3 * big: 3 * big + n] = host.slot_mapping
    narrow[: big] = 0
    narrow[: n] = host.context_lens
    narrow[big: 2 * big + 1] = np.arange(big + 1, dtype=np.int32)  # decode: one query per row
    tables = narrow[2 * big + 1:].reshape(big, layout.max_blocks)
    for row, table in enumerate(host.block_tables):
        tables[row, : len(table)] = table


class DecodeGraphs:
    """Captures `forward_all(StepInputs) -> logits [batch, vocab]` for each ladder size."""

    def __init__(self, forward_all: Callable[[StepInputs], torch.Tensor], max_batch_size: int,
                 max_context_len: int, block_size: int, device: torch.device):
        self.forward_all = forward_all
        self.sizes = graph_batch_sizes(max_batch_size)
        self.max_context_len = max_context_len
        self.layout = StaticLayout(self.sizes[-1], -(-max_context_len // block_size))
        self.device = device
        self.block_size = block_size
        self.wide = torch.zeros(self.layout.wide_len, dtype=torch.int64, device=device)
        self.narrow = torch.zeros(self.layout.narrow_len, dtype=torch.int32, device=device)
        # pinned staging reused every step: the step's .tolist() has finished the last copy
        pin = device.type == "cuda"
        self.wide_host = torch.zeros(self.layout.wide_len, dtype=torch.int64, pin_memory=pin)
        self.narrow_host = torch.zeros(self.layout.narrow_len, dtype=torch.int32, pin_memory=pin)
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        # multi-step decoding: argmax + next step's inputs, a second small graph per size
        self.advance_graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.next_tokens: dict[int, torch.Tensor] = {}
        self.num_replays = 0
        self._burst_host: torch.Tensor | None = None  # run_burst's pinned token rows
        self._burst_events: list[torch.cuda.Event] = []
        self._reset_padding()

    def static_inputs(self, size: int) -> StepInputs:
        big, cols = self.layout.max_batch, self.layout.max_blocks
        wide = self.wide
        return StepInputs(
            input_ids=wide[:size],
            positions=wide[big: big + size],
            rope_lens=wide[2 * big: 2 * big + size],
            slot_mapping=wide[3 * big: 3 * big + size],
            context_lens=self.narrow[:size],
            cu_seqlens_q=self.narrow[big: big + size + 1],
            block_tables=self.narrow[2 * big + 1:].view(big, cols)[:size],
            logits_indices=None,
            max_q_len=1,
            max_context_len=self.max_context_len,
        )

    @torch.inference_mode()
    def capture(self) -> None:
        """Largest first, so smaller graphs reuse the pool the largest one grew."""
        start = time.perf_counter()
        pool = None
        for size in reversed(self.sizes):
            inputs = self.static_inputs(size)
            self.forward_all(inputs)  # warm-up: Triton compiles, cuBLAS picks its kernels
            torch.cuda.synchronize(self.device)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[size] = self.forward_all(inputs)
            pool = graph.pool() if pool is None else pool
            self.graphs[size] = graph
        greedy_next(self.logits[self.sizes[-1]])  # warm-up: Triton compiles outside a capture
        torch.cuda.synchronize(self.device)
        for size in reversed(self.sizes):
            inputs = self.static_inputs(size)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.next_tokens[size] = greedy_next(self.logits[size])
                advance_decode_inputs(inputs, self.next_tokens[size], self.block_size)
            self.advance_graphs[size] = graph
        torch.cuda.synchronize(self.device)
        logger.info("captured %d decode CUDA graphs (batch %d..%d) in %.1f s", len(self.sizes),
                    self.sizes[0], self.sizes[-1], time.perf_counter() - start)

    def _reset_padding(self) -> None:
        big = self.layout.max_batch
        empty = HostStepInputs(*(np.zeros(0, np.int64),) * 4, [], [], [0], [], 1, 0)
        fill_host_buffers(empty, big, self.layout, self.wide_host.numpy(), self.narrow_host.numpy())
        self.wide.copy_(self.wide_host)
        self.narrow.copy_(self.narrow_host)

    def can_run(self, host: HostStepInputs, num_steps: int = 1) -> bool:
        return (
            host.is_uniform_decode
            and host.batch_size <= self.sizes[-1]
            and host.max_context_len + num_steps - 1 <= self.max_context_len
            and max(len(t) for t in host.block_tables) <= self.layout.max_blocks
        )

    def load(self, host: HostStepInputs) -> int:
        """Copy one decode step into the static buffers (two copies); returns the padded size."""
        size = pick_graph_batch_size(self.sizes, host.batch_size)
        assert size is not None and self.can_run(host)
        fill_host_buffers(host, size, self.layout, self.wide_host.numpy(), self.narrow_host.numpy())
        self.wide.copy_(self.wide_host, non_blocking=True)
        prefix = self.layout.narrow_prefix(host.batch_size)
        self.narrow[:prefix].copy_(self.narrow_host[:prefix], non_blocking=True)
        return size

    def run(self, host: HostStepInputs) -> torch.Tensor:
        """Logits [batch, vocab] float32: a view of the graph's output, valid until the next run."""
        size = self.load(host)
        self.graphs[size].replay()
        self.num_replays += 1
        return self.logits[size][: host.batch_size]

    def run_burst(self, host: HostStepInputs, num_steps: int) -> BurstTokens:
        """Greedy multi-step decoding (multi_step.py): forward graph, then the advance graph
        that writes the argmax and the next step's inputs into the static buffers, num_steps
        times, all enqueued at once. Each step's token ids are copied to pinned host memory as
        the step ends; the returned BurstTokens yields them step by step."""
        size = self.load(host)
        forward, advance = self.graphs[size], self.advance_graphs[size]
        rows = self._burst_rows(num_steps)
        for step in range(num_steps):
            forward.replay()
            advance.replay()
            rows[step, :size].copy_(self.next_tokens[size], non_blocking=True)
            self._burst_events[step].record()
        self.num_replays += num_steps
        return BurstTokens(rows[:num_steps], self._burst_events[:num_steps], host.batch_size)

    def _burst_rows(self, num_steps: int) -> torch.Tensor:
        """Pinned [>= num_steps, max_batch] int64 host rows and one event per step, reused: the
        engine has read the last burst's rows before it loads the next one."""
        if self._burst_host is None or self._burst_host.shape[0] < num_steps:
            self._burst_host = torch.zeros((num_steps, self.layout.max_batch), dtype=torch.int64,
                                           pin_memory=True)
            self._burst_events = [torch.cuda.Event() for _ in range(num_steps)]
        return self._burst_host


class BurstTokens:
    """A burst's token ids, one list per step, each available once its step ran on the device:
    iterating waits for one step at a time, so the engine's bookkeeping of step k overlaps the
    device's steps k+1.. instead of waiting for the whole burst."""

    def __init__(self, rows: torch.Tensor, events: list[torch.cuda.Event], batch_size: int):
        self.rows, self.events, self.batch_size = rows, events, batch_size

    def __len__(self) -> int:
        return len(self.events)

    def __iter__(self):
        for row, event in zip(self.rows, self.events):
            event.synchronize()
            yield row[: self.batch_size].tolist()

    def tolist(self) -> list[list[int]]:
        return list(self)
