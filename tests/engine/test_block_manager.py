"""BlockManager: allocation, refcounts, prefix cache (verified hits, last token, LRU eviction)."""

from __future__ import annotations

import itertools

import pytest

from litedeploy.engine import block_manager as block_manager_module
from litedeploy.engine.block_manager import BlockManager
from litedeploy.engine.sequence import Sequence

_seq_ids = itertools.count()


def make_seq(token_ids: list[int]) -> Sequence:
    return Sequence(next(_seq_ids), list(token_ids), len(token_ids), max_new_tokens=4)


def compute_all(bm: BlockManager, seq: Sequence) -> None:
    """What the scheduler does for one whole prefill: match, allocate, compute, commit."""
    bm.match_prefix(seq)
    bm.check_integrity()
    num_new_tokens = seq.num_tokens - seq.num_computed_tokens
    assert bm.can_allocate(seq, num_new_tokens)
    bm.allocate(seq, num_new_tokens)
    bm.check_integrity()
    seq.num_computed_tokens = seq.num_tokens
    bm.commit(seq)
    bm.check_integrity()


def free(bm: BlockManager, seq: Sequence) -> None:
    bm.free(seq)
    bm.check_integrity()


def test_allocate_and_free_counts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    seq = make_seq(list(range(10)))
    assert bm.num_blocks_for(10) == 3 and bm.num_blocks_for(12) == 3 and bm.num_blocks_for(13) == 4
    bm.allocate(seq, 10)
    bm.check_integrity()
    assert len(seq.block_table) == 3 and bm.num_free_blocks == 13
    assert bm.usage() == pytest.approx(3 / 16)
    seq.num_computed_tokens = 10
    assert bm.can_allocate(seq, 2)  # still inside the third block
    bm.allocate(seq, 2)
    assert len(seq.block_table) == 3
    # 3 own + 13 free blocks hold 64 tokens, 10 of them computed
    assert bm.can_allocate(seq, 54) and not bm.can_allocate(seq, 55)
    bm.allocate(seq, 3)
    assert len(seq.block_table) == 4 and bm.num_free_blocks == 12
    free(bm, seq)
    assert seq.block_table == [] and seq.num_computed_tokens == 0
    assert bm.num_free_blocks == 16 and bm.usage() == 0.0


def test_without_prefix_caching_nothing_is_shared() -> None:
    bm = BlockManager(num_blocks=16, block_size=4)
    first, second = make_seq(list(range(9))), make_seq(list(range(9)))
    compute_all(bm, first)
    compute_all(bm, second)
    assert second.num_cached_tokens == 0 and not set(first.block_table) & set(second.block_table)
    free(bm, first)
    free(bm, second)
    assert bm.num_free_blocks == 16 and bm.stats.num_prefix_queries_tokens == 0


def test_shared_prefix_shares_blocks_with_refcounts() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    compute_all(bm, first)
    assert first.num_cached_tokens == 0
    second = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 42, 43, 44])
    bm.match_prefix(second)
    bm.check_integrity()
    assert second.block_table == first.block_table[:2]
    assert second.num_computed_tokens == second.num_cached_tokens == 8
    assert [bm.block_ref_count(b) for b in first.block_table] == [2, 2, 1]
    assert bm.stats.num_prefix_hit_tokens == 8
    assert bm.stats.num_prefix_queries_tokens == 10 + 11
    bm.allocate(second, 3)
    assert len(second.block_table) == 3 and second.block_table[2] != first.block_table[2]
    free(bm, first)
    assert [bm.block_ref_count(b) for b in second.block_table] == [1, 1, 1]
    # first's partial third block was never cached, so it is free again
    assert bm.num_free_blocks == 16 - 3
    free(bm, second)
    assert bm.num_free_blocks == 16


def test_a_prefix_diverging_mid_block_only_shares_the_full_blocks_before() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    compute_all(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9]))
    other = make_seq([1, 2, 3, 4, 5, 6, 0, 8, 9])
    bm.match_prefix(other)
    assert other.num_computed_tokens == 4 and len(other.block_table) == 1


def test_last_token_is_always_recomputed() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    compute_all(bm, first)
    same = make_seq([1, 2, 3, 4, 5, 6, 7, 8])
    bm.match_prefix(same)
    # the block with the last token is not reused (it would have to be rewritten): one block hit
    assert same.block_table == first.block_table[:1] and same.num_computed_tokens == 4
    bm.allocate(same, 4)
    assert same.block_table[1] != first.block_table[1]
    longer = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    bm.match_prefix(longer)
    assert longer.block_table == first.block_table and longer.num_computed_tokens == 8
    bm.check_integrity()


def test_generated_tokens_are_cached_too() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    seq = make_seq([1, 2, 3])
    compute_all(bm, seq)
    for token_id in [50, 51, 52]:  # decode: the sampled token is computed in the next step
        seq.append_token(token_id)
        bm.allocate(seq, 1)
        seq.num_computed_tokens += 1
        bm.commit(seq)
        bm.check_integrity()
    reader = make_seq([1, 2, 3, 50, 51, 52, 60])
    bm.match_prefix(reader)
    assert reader.block_table == seq.block_table[:1] and reader.num_computed_tokens == 4
    assert reader.num_cached_tokens == 4


def test_hash_collision_gives_no_false_hit(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(block_manager_module, "hash_block_tokens", lambda parent, tokens: 7)
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    cached = make_seq([1, 2, 3, 4, 5, 6, 7, 8, 9])
    compute_all(bm, cached)
    for tokens, num_expected_hits in [([1, 2, 3, 4, 9, 9, 9, 9, 9], 4), ([5, 6, 7, 8, 9], 0)]:
        probe = make_seq(tokens)
        compute_all(bm, probe)
        assert probe.num_computed_tokens == len(tokens)
        assert probe.num_cached_tokens == num_expected_hits
        free(bm, probe)
    free(bm, cached)
    assert bm.num_free_blocks == 16


def test_hit_needs_the_same_parent_block(monkeypatch: pytest.MonkeyPatch) -> None:
    # a hash that ignores the parent: the same 4 tokens after a different prefix share a key
    monkeypatch.setattr(
        block_manager_module, "hash_block_tokens", lambda parent, tokens: hash(tokens)
    )
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    compute_all(bm, make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0]))
    compute_all(bm, make_seq([9, 9, 9, 9, 5, 6, 7, 8, 0]))  # its 2nd block loses the key race
    probe = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 1])
    bm.match_prefix(probe)
    assert probe.num_computed_tokens == 4  # the 5,6,7,8 block cached after 1,2,3,4 is not ours


def test_hit_needs_the_parent_block_it_was_cached_after_not_a_reuse_of_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr(
        block_manager_module, "hash_block_tokens", lambda parent, tokens: hash(tokens)
    )
    bm = BlockManager(num_blocks=5, block_size=4, enable_prefix_caching=True)
    short, long = make_seq([1, 2, 3, 4, 0]), make_seq([1, 2, 3, 4, 5, 6, 7, 8, 0])
    for seq in (short, long):  # admitted together: long's first block duplicates short's
        bm.match_prefix(seq)
        bm.allocate(seq, seq.num_tokens)
    for seq in (short, long):
        seq.num_computed_tokens = seq.num_tokens
        bm.commit(seq)
    parent_block_id = short.block_table[0]  # long's 5,6,7,8 block was cached after this one
    free(bm, short)
    filler = make_seq([7])
    compute_all(bm, filler)  # takes the free block, so the next one is the evicted parent
    reuse = make_seq([9, 9, 9, 9])
    compute_all(bm, reuse)
    assert reuse.block_table == [parent_block_id]  # the parent now holds 9,9,9,9
    probe = make_seq([9, 9, 9, 9, 5, 6, 7, 8, 1])
    bm.match_prefix(probe)
    assert probe.num_computed_tokens == 4


def test_released_cached_blocks_are_evicted_least_recently_released_first() -> None:
    bm = BlockManager(num_blocks=8, block_size=4, enable_prefix_caching=True)
    prompts = {name: [base] * 4 + [0] for name, base in [("x", 10), ("y", 20), ("z", 30)]}
    seqs = {name: make_seq(tokens) for name, tokens in prompts.items()}
    for seq in seqs.values():
        compute_all(bm, seq)
    block_of = {name: seq.block_table[0] for name, seq in seqs.items()}  # the cached full block
    for name in ["x", "y", "z"]:  # release order: x, y, z
        free(bm, seqs[name])
    assert bm.num_free_blocks == 8 and bm.usage() == 0.0
    # touching y's cached block (hit, then released again) makes it the most recent
    touch = make_seq(prompts["y"])
    bm.match_prefix(touch)
    assert touch.block_table == [block_of["y"]] and bm.num_free_blocks == 7
    free(bm, touch)
    hog = make_seq(list(range(100, 124)))  # 6 blocks: 5 free ones + 1 eviction
    compute_all(bm, hog)
    assert bm.stats.num_evictions == 1
    assert block_of["x"] in hog.block_table
    assert block_of["y"] not in hog.block_table and block_of["z"] not in hog.block_table
    hog_tail = make_seq(list(range(200, 204)))  # 1 more: z was released before y's touch
    compute_all(bm, hog_tail)
    assert bm.stats.num_evictions == 2 and hog_tail.block_table == [block_of["z"]]
    assert [_num_hit_tokens(bm, prompts[name]) for name in "xyz"] == [0, 4, 0]


def _num_hit_tokens(bm: BlockManager, tokens: list[int]) -> int:
    probe = make_seq(tokens)
    bm.match_prefix(probe)
    num_hit_tokens = probe.num_computed_tokens
    free(bm, probe)
    return num_hit_tokens


def test_duplicate_blocks_computed_concurrently_are_freed_not_cached() -> None:
    bm = BlockManager(num_blocks=16, block_size=4, enable_prefix_caching=True)
    first, second = make_seq([1, 2, 3, 4, 5]), make_seq([1, 2, 3, 4, 5])
    for seq in (first, second):  # both admitted before either is computed: no hit
        bm.match_prefix(seq)
        bm.allocate(seq, seq.num_tokens)
    for seq in (first, second):
        seq.num_computed_tokens = seq.num_tokens
        bm.commit(seq)
        bm.check_integrity()
    free(bm, second)
    free(bm, first)
    assert _num_hit_tokens(bm, [1, 2, 3, 4, 9]) == 4
    assert bm.num_free_blocks == 16


def test_integrity_check_catches_leaks_and_bad_refcounts() -> None:
    bm = BlockManager(num_blocks=8, block_size=4)
    seq = make_seq(list(range(8)))
    bm.allocate(seq, 8)
    seq.block_table.append(seq.block_table[0])
    with pytest.raises(AssertionError, match="refcount"):
        bm.check_integrity()
    seq.block_table.pop()
    bm.check_integrity()
    seq.block_table.pop()  # a block nobody holds and nobody can allocate: a leak
    with pytest.raises(AssertionError, match="refcount 1 but in 0 tables"):
        bm.check_integrity()


def test_bad_sizes_are_rejected() -> None:
    with pytest.raises(ValueError, match="num_blocks=0"):
        BlockManager(num_blocks=0, block_size=4)
