"""Token-budget scheduler: running sequences first, then waiting ones, preemption by recompute.

The scheduler deals in tokens, not phases: each step grants a sequence
min(num_tokens - num_computed_tokens, remaining budget) tokens, so a first prefill, a prefill
chunk, a prompt after a prefix-cache hit and a decode step are one path. Blocks are allocated as
the tokens are scheduled. When a running sequence cannot get its blocks, the newest running
sequence is preempted: its blocks are freed and it later recomputes prompt + generated tokens.
"""

from __future__ import annotations

import bisect
from collections import deque
from dataclasses import dataclass

from litedeploy.engine.block_manager import BlockManager
from litedeploy.engine.sequence import Sequence, SequenceStatus
from litedeploy.errors import RequestError


@dataclass
class ScheduledSequence:
    seq: Sequence
    # this step computes token_ids[num_computed_tokens : num_computed_tokens + num_new_tokens]
    num_new_tokens: int


@dataclass
class SchedulerOutput:
    scheduled: list[ScheduledSequence]
    preempted: list[Sequence]  # preempted during this schedule() call, already back in waiting

    @property
    def is_empty(self) -> bool:
        return not self.scheduled

    @property
    def num_batched_tokens(self) -> int:
        return sum(item.num_new_tokens for item in self.scheduled)


def _by_arrival(seq: Sequence) -> int:
    return seq.arrival_index


class Scheduler:
    def __init__(
        self,
        block_manager: BlockManager,
        max_batch_size: int,
        max_num_batched_tokens: int,
        max_model_len: int,
        prefill_interval: int = 16,
    ):
        for name, value in [
            ("max_batch_size", max_batch_size),
            ("max_num_batched_tokens", max_num_batched_tokens),
            ("max_model_len", max_model_len),
        ]:
            if value < 1:
                raise ValueError(f"{name} must be >= 1, got {value}")
        self.block_manager = block_manager
        self.max_batch_size = max_batch_size
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.prefill_interval = prefill_interval
        self._steps_since_admission = 0  # decode steps run while someone waited
        # an admission chunks only its first prompt; later ones enter whole or wait (a chunk's
        # rest would make the next step a small eager mixed step instead of a graphed decode)
        self.whole_prompts_after_first = True
        self.waiting: deque[Sequence] = deque()  # FCFS; preempted sequences go to the front
        self.running: list[Sequence] = []  # sorted by arrival_index
        self._unfinished: dict[int, Sequence] = {}  # seq_id -> seq, waiting or running
        self._next_arrival_index = 0

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def is_full(self) -> bool:
        return len(self.running) >= self.max_batch_size

    def has_unfinished(self) -> bool:
        return bool(self._unfinished)

    def add(self, seq: Sequence) -> None:
        """Queue a request, or raise RequestError now if it could never be served."""
        self._check_fits(seq)
        assert seq.seq_id not in self._unfinished, f"seq_id {seq.seq_id} is already scheduled"
        assert seq.status is SequenceStatus.WAITING and not seq.block_table
        seq.arrival_index = self._next_arrival_index
        self._next_arrival_index += 1
        self._unfinished[seq.seq_id] = seq
        self.waiting.append(seq)

    def _check_fits(self, seq: Sequence) -> None:
        if seq.num_prompt_tokens < 1:
            raise RequestError("the prompt is empty; send at least one token")
        if seq.max_new_tokens < 1:
            raise RequestError(f"max_new_tokens is {seq.max_new_tokens}; it must be at least 1")
        num_total_tokens = seq.num_prompt_tokens + seq.max_new_tokens
        if num_total_tokens > self.max_model_len:
            raise RequestError(
                f"the prompt has {seq.num_prompt_tokens} tokens and max_new_tokens is "
                f"{seq.max_new_tokens}: {num_total_tokens} tokens exceed the model length "
                f"limit of {self.max_model_len}; shorten the prompt, lower max_new_tokens "
                "or raise session_len"
            )
        num_blocks_needed = self.block_manager.num_blocks_for(num_total_tokens)
        if num_blocks_needed > self.block_manager.num_blocks:
            raise RequestError(
                f"the prompt ({seq.num_prompt_tokens} tokens) plus max_new_tokens "
                f"({seq.max_new_tokens}) needs {num_blocks_needed} KV-cache blocks of "
                f"{self.block_manager.block_size} tokens but the cache has only "
                f"{self.block_manager.num_blocks}; lower max_new_tokens, shorten the prompt "
                "or give the KV cache more memory (cache_max_entry_count)"
            )

    # ---- one step ----------------------------------------------------------------------------

    def admission_due(self) -> bool:
        """Whether waiting sequences may enter now (lmdeploy's prefill policy).

        At once while the batch is less than half full (latency); once it is busier, only every
        `prefill_interval` decode steps, so the prompts that queued meanwhile are prefilled
        together in one big step instead of one by one in many small mixed steps, each of which
        runs eagerly and breaks a run of graph-replayed decode steps (throughput).
        """
        if not self.waiting or len(self.running) >= self.max_batch_size:
            return False
        return (2 * len(self.running) < self.max_batch_size
                or self._steps_since_admission >= self.prefill_interval)

    def count_decode_steps(self, num_steps: int) -> None:
        """Decode steps that ran without going through schedule() (multi-step bursts)."""
        if self.waiting:
            self._steps_since_admission += num_steps

    def steps_until_admission(self) -> int:
        return max(0, self.prefill_interval - self._steps_since_admission)

    def schedule(self) -> SchedulerOutput:
        output = SchedulerOutput(scheduled=[], preempted=[])
        budget = self._schedule_running(output, self.max_num_batched_tokens)
        # after a preemption blocks are short: admitting now would only preempt again
        if not output.preempted and self.admission_due():
            self._schedule_waiting(output, budget)
            self._steps_since_admission = 0
        else:
            self.count_decode_steps(1)
        return output

    def _schedule_running(self, output: SchedulerOutput, budget: int) -> int:
        index = 0
        while index < len(self.running) and budget > 0:
            if len(output.scheduled) >= self.max_batch_size:
                break
            seq = self.running[index]
            num_remaining = seq.num_tokens - seq.num_computed_tokens
            assert num_remaining > 0, (
                f"running seq {seq.seq_id} has no token to compute: append the sampled token "
                "or finish it before the next schedule()"
            )
            num_new_tokens = min(num_remaining, budget)
            while not self.block_manager.can_allocate(seq, num_new_tokens):
                victim = self.running.pop()  # the newest, never one already scheduled
                self._preempt(victim)
                output.preempted.append(victim)
                if victim is seq:
                    break
            if seq.status is not SequenceStatus.RUNNING:
                break  # it preempted itself: every later one is gone too
            self.block_manager.allocate(seq, num_new_tokens)
            output.scheduled.append(ScheduledSequence(seq, num_new_tokens))
            budget -= num_new_tokens
            index += 1
        return budget

    def _preempt(self, seq: Sequence) -> None:
        self.block_manager.free(seq)
        seq.status = SequenceStatus.WAITING
        seq.num_preemptions += 1
        # victims leave newest first, so pushing each to the front keeps arrival order there
        self.waiting.appendleft(seq)

    def _schedule_waiting(self, output: SchedulerOutput, budget: int) -> None:
        num_admitted = 0
        while self.waiting and budget > 0 and len(output.scheduled) < self.max_batch_size:
            seq = self.waiting[0]
            self.block_manager.match_prefix(seq)
            # match_prefix leaves at least the last token to compute
            num_remaining = seq.num_tokens - seq.num_computed_tokens
            if (num_remaining > budget and self.whole_prompts_after_first
                    and num_admitted > 0):
                self.block_manager.free(seq)  # give back the prefix hits; whole next time
                break
            num_new_tokens = min(num_remaining, budget)
            if not self.block_manager.can_allocate(seq, num_new_tokens):
                self.block_manager.free(seq)  # give back the prefix hits; retry next step
                break  # FCFS: no skipping the head of the queue
            self.block_manager.allocate(seq, num_new_tokens)
            self.waiting.popleft()
            seq.status = SequenceStatus.RUNNING
            bisect.insort(self.running, seq, key=_by_arrival)
            output.scheduled.append(ScheduledSequence(seq, num_new_tokens))
            budget -= num_new_tokens
            num_admitted += 1

    def update(self, output: SchedulerOutput) -> list[Sequence]:
        """Account for a finished model step; return the sequences that must sample a token."""
        ready_to_sample = []
        for item in output.scheduled:
            seq = item.seq
            if seq.status is not SequenceStatus.RUNNING:
                continue  # aborted between schedule() and update()
            seq.num_computed_tokens += item.num_new_tokens
            assert seq.num_computed_tokens <= seq.num_tokens
            self.block_manager.commit(seq)
            if seq.num_computed_tokens == seq.num_tokens:
                ready_to_sample.append(seq)
        return ready_to_sample

    # ---- leaving -----------------------------------------------------------------------------

    def finish(self, seq: Sequence) -> None:
        if self._unfinished.pop(seq.seq_id, None) is None:
            return  # already finished or aborted
        if seq.status is SequenceStatus.RUNNING:
            self.running.remove(seq)
        else:
            self.waiting.remove(seq)
        self.block_manager.free(seq)
        seq.status = SequenceStatus.FINISHED

    def abort(self, seq_id: int) -> Sequence | None:
        seq = self._unfinished.get(seq_id)
        if seq is not None:
            self.finish(seq)
        return seq

    def check_integrity(self) -> None:
        self.block_manager.check_integrity()
        problems = []
        for seq in self.running:
            if seq.status is not SequenceStatus.RUNNING:
                problems.append(f"seq {seq.seq_id} in running with status {seq.status.name}")
            num_covered = len(seq.block_table) * self.block_manager.block_size
            if num_covered < seq.num_computed_tokens:
                problems.append(
                    f"seq {seq.seq_id}: table covers {num_covered} of "
                    f"{seq.num_computed_tokens} computed tokens"
                )
        for seq in self.waiting:
            if seq.status is not SequenceStatus.WAITING or seq.block_table:
                problems.append(f"waiting seq {seq.seq_id} is {seq.status.name} with blocks")
        if [s.arrival_index for s in self.running] != sorted(s.arrival_index for s in self.running):
            problems.append("running is not in arrival order")
        queued = [id(seq) for seq in self.running] + [id(seq) for seq in self.waiting]
        if sorted(queued) != sorted(id(seq) for seq in self._unfinished.values()):
            problems.append("running + waiting differ from the unfinished sequences")
        if problems:
            raise AssertionError("scheduler integrity: " + "; ".join(problems))
