"""Scheduler: running first, token budget, chunked prefill, batch size, preemption, rejection."""

from __future__ import annotations

import itertools
import random

import pytest

from litedeploy.engine.block_manager import BlockManager
from litedeploy.engine.scheduler import Scheduler, SchedulerOutput
from litedeploy.engine.sequence import Sequence, SequenceStatus
from litedeploy.errors import RequestError

_seq_ids = itertools.count()


def make_seq(num_prompt_tokens: int, max_new_tokens: int = 4, first_token: int = 0) -> Sequence:
    token_ids = list(range(first_token, first_token + num_prompt_tokens))
    return Sequence(next(_seq_ids), token_ids, num_prompt_tokens, max_new_tokens)


def make_scheduler(
    num_blocks: int = 16,
    block_size: int = 4,
    max_batch_size: int = 8,
    max_num_batched_tokens: int = 64,
    max_model_len: int = 64,
    enable_prefix_caching: bool = False,
    prefill_interval: int = 0,  # 0: admit whenever there is room (the policy has its own test)
) -> Scheduler:
    block_manager = BlockManager(num_blocks, block_size, enable_prefix_caching)
    return Scheduler(block_manager, max_batch_size, max_num_batched_tokens, max_model_len,
                     prefill_interval)


def step(scheduler: Scheduler, next_token: int = 99) -> SchedulerOutput:
    """One engine step: schedule, 'run', update, sample for the ready ones, finish at the limit."""
    output = scheduler.schedule()
    scheduler.check_integrity()
    for seq in scheduler.update(output):
        seq.append_token(next_token)
        if seq.num_generated_tokens >= seq.max_new_tokens:
            scheduler.finish(seq)
    scheduler.check_integrity()
    return output


def plan(output: SchedulerOutput) -> list[tuple[int, int]]:
    return [(item.seq.seq_id, item.num_new_tokens) for item in output.scheduled]


def test_running_first_then_waiting() -> None:
    scheduler = make_scheduler()
    first, second = make_seq(3), make_seq(5)
    scheduler.add(first)
    scheduler.add(second)
    assert plan(step(scheduler)) == [(first.seq_id, 3), (second.seq_id, 5)]
    third = make_seq(2)
    scheduler.add(third)
    assert scheduler.num_waiting == 1 and scheduler.num_running == 2
    assert plan(step(scheduler)) == [(first.seq_id, 1), (second.seq_id, 1), (third.seq_id, 2)]
    assert all(seq.status is SequenceStatus.RUNNING for seq in (first, second, third))


def test_chunked_prefill_shares_the_budget_with_a_decode() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=5)
    decoder = make_seq(2, max_new_tokens=10)
    scheduler.add(decoder)
    assert plan(step(scheduler)) == [(decoder.seq_id, 2)]
    long_prompt = make_seq(10)
    scheduler.add(long_prompt)
    chunks = []
    for _ in range(3):
        output = step(scheduler)
        assert output.num_batched_tokens <= 5
        assert plan(output)[0] == (decoder.seq_id, 1)
        chunks.append(plan(output)[1])
    assert chunks == [(long_prompt.seq_id, 4), (long_prompt.seq_id, 4), (long_prompt.seq_id, 2)]
    assert long_prompt.num_computed_tokens == 10 and long_prompt.num_generated_tokens == 1
    assert plan(step(scheduler)) == [(decoder.seq_id, 1), (long_prompt.seq_id, 1)]


def test_budget_smaller_than_one_prompt_admits_only_its_first_chunk() -> None:
    scheduler = make_scheduler(max_num_batched_tokens=4)
    first, second = make_seq(6), make_seq(3)
    scheduler.add(first)
    scheduler.add(second)
    assert plan(step(scheduler)) == [(first.seq_id, 4)]
    assert plan(step(scheduler)) == [(first.seq_id, 2), (second.seq_id, 2)]
    assert plan(step(scheduler)) == [(first.seq_id, 1), (second.seq_id, 1)]


def test_an_admission_chunks_only_its_first_prompt() -> None:
    """A later prompt that does not fit whole waits for the next admission instead of leaving
    a small rest chunk for the next step; the policy can be switched back."""
    for whole in (True, False):
        scheduler = make_scheduler(max_num_batched_tokens=8)
        scheduler.whole_prompts_after_first = whole
        seqs = [make_seq(3, max_new_tokens=5), make_seq(4, max_new_tokens=5), make_seq(5)]
        for seq in seqs:
            scheduler.add(seq)
        a, b, c = (seq.seq_id for seq in seqs)
        if whole:
            assert plan(step(scheduler)) == [(a, 3), (b, 4)]
            assert plan(step(scheduler)) == [(a, 1), (b, 1), (c, 5)]
        else:
            assert plan(step(scheduler)) == [(a, 3), (b, 4), (c, 1)]
            assert plan(step(scheduler)) == [(a, 1), (b, 1), (c, 4)]


def test_max_batch_size_limits_the_sequences_per_step() -> None:
    scheduler = make_scheduler(max_batch_size=2)
    seqs = [make_seq(2, max_new_tokens=1), make_seq(2, max_new_tokens=3), make_seq(2)]
    for seq in seqs:
        scheduler.add(seq)
    assert plan(step(scheduler)) == [(seqs[0].seq_id, 2), (seqs[1].seq_id, 2)]
    assert seqs[0].is_finished and seqs[2].status is SequenceStatus.WAITING
    assert plan(step(scheduler)) == [(seqs[1].seq_id, 1), (seqs[2].seq_id, 2)]


def test_busy_batch_admits_every_prefill_interval_steps() -> None:
    """Under half full: admitted at once. Over half full: waiting prompts gather for
    prefill_interval decode steps, then enter together in one step."""
    scheduler = make_scheduler(num_blocks=64, max_batch_size=4, prefill_interval=3)
    first = make_seq(2, max_new_tokens=30)
    scheduler.add(first)
    step(scheduler)
    second = make_seq(2, max_new_tokens=30)
    scheduler.add(second)  # 1 running of 4: under half full
    assert second.seq_id in [sid for sid, _ in plan(step(scheduler))]
    late = [make_seq(2, max_new_tokens=30), make_seq(3, max_new_tokens=30)]
    for seq in late:
        scheduler.add(seq)  # 2 running of 4: busy, so they wait
    waited = 0
    while late[0].status is SequenceStatus.WAITING:
        output = step(scheduler)
        waited += 1
        assert waited <= 4
    assert waited == 4 and scheduler.prefill_interval == 3  # 3 decode steps, then admission
    assert plan(output)[-2:] == [(late[0].seq_id, 2), (late[1].seq_id, 3)]  # together


def test_preempts_the_newest_and_recomputes_it_with_its_generated_tokens() -> None:
    # 4 blocks of 4 tokens; two sequences of 4 prompt + 8 new tokens cannot both finish
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    older, newer = make_seq(4, max_new_tokens=8), make_seq(4, max_new_tokens=8, first_token=50)
    scheduler.add(older)
    scheduler.add(newer)
    step(scheduler)  # both prefilled: 2 blocks, 1 token generated each
    step(scheduler)  # both need their second block: all 4 in use
    outputs = [step(scheduler, next_token=7) for _ in range(4)]
    preempted = [seq for output in outputs for seq in output.preempted]
    assert preempted == [newer] and newer.num_preemptions == 1 and older.num_preemptions == 0
    assert newer.status is SequenceStatus.WAITING and newer.block_table == []
    kept_tokens = list(newer.token_ids)
    # preempted when its 9th token needed a third block: 5 tokens generated by then
    assert kept_tokens[:4] == [50, 51, 52, 53] and newer.num_generated_tokens == 5
    while not older.is_finished:
        assert [item.seq for item in step(scheduler).scheduled] == [older]
    output = step(scheduler)
    # all of prompt + generated tokens are computed again; nothing generated was lost
    assert plan(output) == [(newer.seq_id, len(kept_tokens))]
    assert newer.token_ids[: len(kept_tokens)] == kept_tokens
    while scheduler.has_unfinished():
        step(scheduler)
    assert newer.num_generated_tokens == 8
    assert scheduler.block_manager.num_free_blocks == 4


def test_the_victim_is_the_newest_running_not_the_next_one() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    older, middle, newest = make_seq(7), make_seq(2), make_seq(2)
    for seq in (older, middle, newest):
        scheduler.add(seq)
    step(scheduler)  # blocks: older 2, middle 1, newest 1
    step(scheduler)
    output = step(scheduler)  # older's 9th token needs a third block
    assert output.preempted == [newest]
    assert plan(output) == [(older.seq_id, 1), (middle.seq_id, 1)]


def test_a_sequence_short_of_blocks_preempts_itself_when_it_is_the_newest() -> None:
    scheduler = make_scheduler(num_blocks=3, max_model_len=12)
    older, newer = make_seq(6, max_new_tokens=3), make_seq(3, max_new_tokens=8)
    scheduler.add(older)
    scheduler.add(newer)
    step(scheduler)  # older: 2 blocks, newer: 1 block; all 3 in use
    step(scheduler)  # both still inside their blocks
    output = step(scheduler)
    # newer needs a second block, none is free, and it is the newest running: it yields itself
    assert output.preempted == [newer] and plan(output) == [(older.seq_id, 1)]
    assert older.is_finished and scheduler.waiting[0] is newer
    assert plan(step(scheduler)) == [(newer.seq_id, 5)]


def test_a_preempted_sequence_goes_first_but_not_back_in_the_same_call() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    older, newer = make_seq(4, max_new_tokens=8), make_seq(4, max_new_tokens=8)
    scheduler.add(older)
    scheduler.add(newer)
    for _ in range(5):  # 9 tokens each, 8 computed: 2 blocks each, all 4 in use
        step(scheduler)
    late = make_seq(1)
    scheduler.add(late)
    # with 4 tokens of budget left, newer's first recompute chunk would fit the freed block
    scheduler.max_num_batched_tokens = 5
    output = step(scheduler)
    assert output.preempted == [newer] and plan(output) == [(older.seq_id, 1)]
    assert list(scheduler.waiting) == [newer, late]  # the preempted one is not sent to the back
    assert plan(step(scheduler)) == [(older.seq_id, 1), (newer.seq_id, 4)]


def test_the_head_of_the_queue_is_not_skipped() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    running = make_seq(8, max_new_tokens=4)
    scheduler.add(running)
    step(scheduler)  # 2 blocks used, 2 free
    big, small = make_seq(12, max_new_tokens=1), make_seq(2, max_new_tokens=1)
    scheduler.add(big)  # needs 3 blocks: waits for running
    scheduler.add(small)  # would fit, but arrived later
    assert plan(step(scheduler)) == [(running.seq_id, 1)]
    assert list(scheduler.waiting) == [big, small]


def test_requests_that_can_never_fit_are_rejected_at_add() -> None:
    scheduler = make_scheduler(num_blocks=4, max_model_len=16)
    with pytest.raises(RequestError, match=r"10 tokens.*max_new_tokens is 8: 18 .* 16"):
        scheduler.add(make_seq(10, max_new_tokens=8))
    roomy = make_scheduler(num_blocks=4, max_model_len=100)
    with pytest.raises(RequestError, match=r"needs 5 KV-cache blocks of 4 tokens .* only 4"):
        roomy.add(make_seq(10, max_new_tokens=10))
    with pytest.raises(RequestError, match="at least 1"):
        roomy.add(make_seq(3, max_new_tokens=0))
    assert not scheduler.has_unfinished() and not roomy.has_unfinished()
    roomy.add(make_seq(10, max_new_tokens=6))  # exactly 16 tokens: fits


def test_abort_waiting_and_running() -> None:
    scheduler = make_scheduler(max_batch_size=1)
    running, waiting = make_seq(5), make_seq(5)
    scheduler.add(running)
    scheduler.add(waiting)
    step(scheduler)
    assert running.block_table and waiting.status is SequenceStatus.WAITING
    assert scheduler.abort(waiting.seq_id) is waiting and waiting.is_finished
    scheduler.check_integrity()
    assert scheduler.abort(running.seq_id) is running and running.is_finished
    assert running.block_table == [] and scheduler.block_manager.num_free_blocks == 16
    assert scheduler.abort(running.seq_id) is None and scheduler.abort(12345) is None
    assert not scheduler.has_unfinished() and scheduler.schedule().is_empty
    scheduler.check_integrity()


def test_abort_between_schedule_and_update_is_ignored_by_update() -> None:
    scheduler = make_scheduler()
    seq = make_seq(5)
    scheduler.add(seq)
    output = scheduler.schedule()
    scheduler.abort(seq.seq_id)
    assert scheduler.update(output) == []
    scheduler.check_integrity()
    assert scheduler.block_manager.num_free_blocks == 16


def test_prefix_hit_still_computes_the_last_token() -> None:
    scheduler = make_scheduler(enable_prefix_caching=True)
    first = make_seq(8, max_new_tokens=1)
    scheduler.add(first)
    step(scheduler)
    assert first.is_finished
    again = make_seq(9, max_new_tokens=1)
    scheduler.add(again)
    assert plan(step(scheduler)) == [(again.seq_id, 1)]  # 8 cached, the 9th computed
    assert again.num_cached_tokens == 8
    same = make_seq(8, max_new_tokens=1)
    scheduler.add(same)
    assert plan(step(scheduler)) == [(same.seq_id, 4)]  # the last block is never reused


class _ShadowKV:
    """What each cache slot holds in a simulated model: the prefix whose last token wrote it.

    A slot's K/V depend on every token up to its position, so a sequence's computed tokens are
    right exactly when each of its slots holds its own prefix. This checks prefix-cache hits.
    """

    def __init__(self, block_manager: BlockManager):
        self.block_manager = block_manager
        self.slots: dict[tuple[int, int], tuple[int, ...]] = {}

    def _slot(self, seq: Sequence, position: int) -> tuple[int, int]:
        block_size = self.block_manager.block_size
        return seq.block_table[position // block_size], position % block_size

    def check_computed(self, seq: Sequence) -> None:
        for position in range(seq.num_computed_tokens):
            prefix = self.slots.get(self._slot(seq, position))
            assert prefix == tuple(seq.token_ids[: position + 1]), (seq, position)

    def write(self, seq: Sequence, num_new_tokens: int) -> None:
        for position in range(seq.num_computed_tokens, seq.num_computed_tokens + num_new_tokens):
            block_id, offset = self._slot(seq, position)
            assert self.block_manager.block_ref_count(block_id) == 1, "write into a shared block"
            self.slots[(block_id, offset)] = tuple(seq.token_ids[: position + 1])


def _random_step(scheduler: Scheduler, shadow: _ShadowKV, rng: random.Random) -> set[int]:
    """One engine step with random sampled tokens; returns the ids aborted mid-step."""
    output = scheduler.schedule()
    scheduler.check_integrity()
    assert output.is_empty == (not scheduler.has_unfinished()), "no progress: deadlock"
    assert output.num_batched_tokens <= scheduler.max_num_batched_tokens
    assert len(output.scheduled) <= scheduler.max_batch_size
    assert len({id(item.seq) for item in output.scheduled}) == len(output.scheduled)
    for item in output.scheduled:
        assert item.num_new_tokens >= 1 and item.seq.status is SequenceStatus.RUNNING
        shadow.check_computed(item.seq)
        shadow.write(item.seq, item.num_new_tokens)
    aborted = set()
    if output.scheduled and rng.random() < 0.03:  # a client leaves while the model runs
        aborted.add(rng.choice(output.scheduled).seq.seq_id)
        scheduler.abort(*aborted)
        scheduler.check_integrity()
    for seq in scheduler.update(output):
        seq.append_token(rng.randrange(4))
        if seq.num_generated_tokens >= seq.max_new_tokens:
            scheduler.finish(seq)
    return aborted


def _random_seq(rng: random.Random, prefixes: list[list[int]]) -> Sequence:
    prefix = rng.choice(prefixes)
    tokens = prefix[: rng.randint(0, len(prefix))] + [rng.randrange(4) for _ in range(8)]
    tokens = tokens[: rng.randint(1, len(tokens))]
    return Sequence(next(_seq_ids), tokens, len(tokens), max_new_tokens=rng.randint(1, 10))


def _fits(scheduler: Scheduler, seq: Sequence) -> bool:
    num_total_tokens = seq.num_prompt_tokens + seq.max_new_tokens
    num_blocks = scheduler.block_manager.num_blocks_for(num_total_tokens)
    return num_total_tokens <= scheduler.max_model_len and (
        num_blocks <= scheduler.block_manager.num_blocks
    )


@pytest.mark.parametrize("enable_prefix_caching", [False, True])
@pytest.mark.parametrize("seed", range(4))
def test_random_operations_keep_every_invariant(seed: int, enable_prefix_caching: bool) -> None:
    rng = random.Random(seed)
    scheduler = make_scheduler(
        num_blocks=rng.choice([6, 8, 12]),
        block_size=rng.choice([2, 4]),
        max_batch_size=rng.randint(2, 5),
        max_num_batched_tokens=rng.randint(1, 16),
        max_model_len=rng.choice([12, 16, 24]),
        enable_prefix_caching=enable_prefix_caching,
    )
    block_manager = scheduler.block_manager
    shadow = _ShadowKV(block_manager)
    prefixes = [[rng.randrange(4) for _ in range(rng.randint(4, 12))] for _ in range(3)]
    seqs: list[Sequence] = []
    aborted: set[int] = set()
    for _ in range(2000):
        choice = rng.random()
        if choice < 0.35 and scheduler.num_waiting < 6:
            seq = _random_seq(rng, prefixes)
            if _fits(scheduler, seq):
                scheduler.add(seq)
                seqs.append(seq)
            else:
                with pytest.raises(RequestError):
                    scheduler.add(seq)
        elif choice < 0.38 and seqs:
            seq_id = rng.choice(seqs).seq_id
            if scheduler.abort(seq_id) is not None:
                aborted.add(seq_id)
        else:
            aborted |= _random_step(scheduler, shadow, rng)
        scheduler.check_integrity()
    for _ in range(10_000):
        if not scheduler.has_unfinished():
            break
        aborted |= _random_step(scheduler, shadow, rng)
        scheduler.check_integrity()
    assert not scheduler.has_unfinished()
    assert block_manager.num_free_blocks == block_manager.num_blocks and block_manager.usage() == 0
    assert len(seqs) > 50 and sum(seq.num_preemptions for seq in seqs) > 0
    for seq in seqs:
        assert seq.is_finished and seq.block_table == []
        if seq.seq_id not in aborted:
            assert seq.num_generated_tokens == seq.max_new_tokens, seq
    if enable_prefix_caching:
        assert block_manager.stats.num_prefix_hit_tokens > 0
