"""Paged KV-cache blocks: allocation, reference counts and a chained-hash prefix cache.

Every block is in exactly one of three places:
  free       refcount 0, holds nothing reusable                    (`_free_block_ids`, LIFO)
  in use     refcount > 0, in the block table of >= 1 sequence
  evictable  refcount 0, registered in the prefix cache            (`_evictable`, LRU by release)
Allocation takes a free block first, the most recently freed one (its pages are already
resident: a lazily mapped CPU cache then only touches as many blocks as are ever used at once),
then evicts the least recently released cached block.

Prefix cache. A full block is registered under `hash_block_tokens(parent_hash, tokens)`. That
hash is only an index: a hit must also have the same tokens and the same parent block (block id
plus the generation it had when the child was registered, so a parent that was evicted and
reused breaks the link). By induction from the first block, a hit therefore holds exactly the
tokens of the whole prefix, whatever the quality of the hash.

The last token of a sequence is always recomputed, because its logits are needed to sample the
next token. Instead of rewriting one slot of a (possibly shared) cached block, `match_prefix`
never reuses the block that holds the last token: no copy-on-write is ever needed, at the cost
of recomputing up to one block on a fully cached prompt.
"""

from __future__ import annotations

from collections import Counter, OrderedDict
from dataclasses import dataclass

from litedeploy.engine.sequence import Sequence

_BlockRef = tuple[int, int]  # (block_id, generation): names one incarnation of a block


def hash_block_tokens(parent_hash: int | None, token_ids: tuple[int, ...]) -> int:
    """Index key of a full block: its tokens chained with the key of the block before it."""
    return hash((parent_hash, token_ids))


@dataclass
class PrefixCacheStats:
    num_prefix_queries_tokens: int = 0  # tokens of sequences looked up at admission
    num_prefix_hit_tokens: int = 0  # of those, tokens served from the cache
    num_evictions: int = 0  # cached blocks dropped to make room

    @property
    def hit_rate(self) -> float:
        return self.num_prefix_hit_tokens / max(self.num_prefix_queries_tokens, 1)


@dataclass
class _Block:
    block_id: int
    ref_count: int = 0
    generation: int = 0  # bumped each time the block is handed out afresh
    hash: int | None = None  # set while registered in the prefix cache
    token_ids: tuple[int, ...] = ()  # the tokens it holds, kept to verify hits
    parent: _BlockRef | None = None  # registered block with the previous tokens; None at the root


@dataclass
class _CommitCursor:
    """How far a sequence's full blocks have been matched or registered in the prefix cache."""

    num_blocks: int = 0
    parent_hash: int | None = None
    # the registered block holding the same tokens as the sequence's last handled block: its own
    # block, or an identical one another sequence registered first
    parent: _BlockRef | None = None
    stopped: bool = False  # a hash collision: give up caching this sequence's later blocks


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = False):
        if num_blocks < 1 or block_size < 1:
            raise ValueError(
                f"num_blocks={num_blocks} and block_size={block_size} must both be >= 1; "
                "give the KV cache more memory or use a smaller block size"
            )
        self.num_blocks = num_blocks
        self.block_size = block_size
        self.enable_prefix_caching = enable_prefix_caching
        self.stats = PrefixCacheStats()
        self._blocks = [_Block(block_id) for block_id in range(num_blocks)]
        # a stack: the next block handed out is the last one freed (lowest ids first at start)
        self._free_block_ids: list[int] = list(reversed(range(num_blocks)))
        self._evictable: OrderedDict[int, None] = OrderedDict()  # oldest release first
        self._hash_to_block_id: dict[int, int] = {}
        self._seqs_with_blocks: dict[int, Sequence] = {}  # seq_id -> seq holding a table
        self._cursors: dict[int, _CommitCursor] = {}  # seq_id -> prefix-cache progress

    @property
    def num_free_blocks(self) -> int:
        """Blocks allocatable right now: free ones plus evictable cached ones."""
        return len(self._free_block_ids) + len(self._evictable)

    def num_blocks_for(self, num_tokens: int) -> int:
        return -(-num_tokens // self.block_size)

    def block_ref_count(self, block_id: int) -> int:
        """How many block tables hold this block (for tests and debugging)."""
        return self._blocks[block_id].ref_count

    def usage(self) -> float:
        """Fraction of blocks in use (refcount > 0)."""
        return 1.0 - self.num_free_blocks / self.num_blocks

    # ---- admission -------------------------------------------------------------------------

    def match_prefix(self, seq: Sequence) -> None:
        """Take the cached blocks that hold a prefix of `seq` (called once per admission)."""
        assert not seq.block_table and seq.num_computed_tokens == 0, (
            f"seq {seq.seq_id}: match_prefix needs an empty table, has {seq.block_table} "
            f"and {seq.num_computed_tokens} computed tokens"
        )
        seq.num_cached_tokens = 0
        if not self.enable_prefix_caching:
            return
        cursor = _CommitCursor()
        self._cursors[seq.seq_id] = cursor
        # the block holding the last token is never reused (see the module docstring)
        num_candidate_blocks = (seq.num_tokens - 1) // self.block_size
        if seq.skip_prefix_cache:  # it needs every prompt position computed (prompt logprobs)
            num_candidate_blocks = 0
        for index in range(num_candidate_blocks):
            tokens = self._block_tokens(seq, index)
            key = hash_block_tokens(cursor.parent_hash, tokens)
            block = self._lookup(key, tokens, cursor.parent)
            if block is None:
                break
            if block.ref_count == 0:
                del self._evictable[block.block_id]
            block.ref_count += 1
            seq.block_table.append(block.block_id)
            self._advance(cursor, key, block)
        if seq.block_table:
            self._seqs_with_blocks[seq.seq_id] = seq
        num_hit_tokens = len(seq.block_table) * self.block_size
        seq.num_computed_tokens = num_hit_tokens
        seq.num_cached_tokens = min(num_hit_tokens, seq.num_prompt_tokens)
        self.stats.num_prefix_queries_tokens += seq.num_tokens
        self.stats.num_prefix_hit_tokens += num_hit_tokens

    def can_allocate(self, seq: Sequence, num_new_tokens: int) -> bool:
        return self._num_missing_blocks(seq, num_new_tokens) <= self.num_free_blocks

    def allocate(self, seq: Sequence, num_new_tokens: int) -> None:
        """Extend the table so it covers num_computed_tokens + num_new_tokens tokens."""
        num_missing = self._num_missing_blocks(seq, num_new_tokens)
        assert num_missing <= self.num_free_blocks, (
            f"seq {seq.seq_id}: needs {num_missing} blocks, {self.num_free_blocks} free; "
            "call can_allocate first"
        )
        for _ in range(num_missing):
            seq.block_table.append(self._take_block())
        if seq.block_table:
            self._seqs_with_blocks[seq.seq_id] = seq

    # ---- after a step ----------------------------------------------------------------------

    def commit(self, seq: Sequence) -> None:
        """Register the blocks that became full and computed in the prefix cache."""
        if not self.enable_prefix_caching:
            return
        cursor = self._cursors.setdefault(seq.seq_id, _CommitCursor())
        num_full_blocks = seq.num_computed_tokens // self.block_size
        while not cursor.stopped and cursor.num_blocks < num_full_blocks:
            tokens = self._block_tokens(seq, cursor.num_blocks)
            key = hash_block_tokens(cursor.parent_hash, tokens)
            canonical = self._lookup(key, tokens, cursor.parent)
            if canonical is None and not self._release_key(key):
                cursor.stopped = True  # an in-use block holds the key: keep it, cache no further
                break
            if canonical is None:  # first time these tokens are cached: register our own block
                canonical = self._blocks[seq.block_table[cursor.num_blocks]]
                canonical.hash, canonical.token_ids, canonical.parent = key, tokens, cursor.parent
                self._hash_to_block_id[key] = canonical.block_id
            # else another sequence cached the same tokens first; ours is freed, not cached
            self._advance(cursor, key, canonical)

    def free(self, seq: Sequence) -> None:
        """Release the table: cached blocks become evictable, the others free."""
        assert not seq.block_table or self._seqs_with_blocks.get(seq.seq_id) is seq, (
            f"seq {seq.seq_id} holds blocks {seq.block_table} this manager did not give it"
        )
        # tail first, so the LRU evicts a chain's last blocks before the blocks they hang from,
        # and the free stack hands the table's blocks out again in their old order
        for block_id in reversed(seq.block_table):
            block = self._blocks[block_id]
            block.ref_count -= 1
            assert block.ref_count >= 0, f"block {block_id} released more often than taken"
            if block.ref_count == 0 and block.hash is not None:
                self._evictable[block_id] = None
            elif block.ref_count == 0:
                self._free_block_ids.append(block_id)
        seq.block_table = []
        seq.num_computed_tokens = 0
        self._seqs_with_blocks.pop(seq.seq_id, None)
        self._cursors.pop(seq.seq_id, None)

    # ---- invariants ------------------------------------------------------------------------

    def check_integrity(self) -> None:
        """Raise AssertionError naming every broken invariant (leaks, double frees, bad refs)."""
        problems: list[str] = []
        free_ids = set(self._free_block_ids)
        if len(free_ids) != len(self._free_block_ids):
            problems.append("a block is twice on the free list")
        table_refs: Counter[int] = Counter()
        for seq_id, seq in self._seqs_with_blocks.items():
            if len(set(seq.block_table)) != len(seq.block_table):
                problems.append(f"seq {seq_id} repeats a block: {seq.block_table}")
            if len(seq.block_table) * self.block_size < seq.num_computed_tokens:
                problems.append(
                    f"seq {seq_id}: {len(seq.block_table)} blocks cannot hold "
                    f"{seq.num_computed_tokens} computed tokens"
                )
            table_refs.update(seq.block_table)
        for block in self._blocks:
            problems.extend(self._block_problems(block, table_refs[block.block_id], free_ids))
        for key, block_id in self._hash_to_block_id.items():
            if self._blocks[block_id].hash != key:
                problems.append(f"hash table points at block {block_id}, which has another hash")
        num_used = sum(block.ref_count > 0 for block in self._blocks)
        if len(free_ids) + len(self._evictable) + num_used != self.num_blocks:
            problems.append(
                f"free {len(free_ids)} + evictable {len(self._evictable)} + used {num_used} "
                f"!= total {self.num_blocks}"
            )
        if problems:
            raise AssertionError("block manager integrity: " + "; ".join(problems[:20]))

    def _block_problems(self, block: _Block, num_table_refs: int, free_ids: set[int]) -> list[str]:
        name = f"block {block.block_id}"
        in_free, in_evictable = block.block_id in free_ids, block.block_id in self._evictable
        problems = []
        if block.ref_count != num_table_refs:
            problems.append(f"{name} refcount {block.ref_count} but in {num_table_refs} tables")
        if block.ref_count > 0 and (in_free or in_evictable):
            problems.append(f"{name} in use but also free/evictable")
        if block.ref_count == 0 and in_free == in_evictable:
            where = "both free and evictable" if in_free else "leaked (neither free nor evictable)"
            problems.append(f"{name} unused and {where}")
        if in_free and block.hash is not None:
            problems.append(f"{name} free but still registered in the prefix cache")
        if in_evictable and block.hash is None:
            problems.append(f"{name} evictable but not registered in the prefix cache")
        if block.hash is not None and self._hash_to_block_id.get(block.hash) != block.block_id:
            problems.append(f"{name} has a hash the table does not map to it")
        return problems

    # ---- internals -------------------------------------------------------------------------

    def _num_missing_blocks(self, seq: Sequence, num_new_tokens: int) -> int:
        num_needed = self.num_blocks_for(seq.num_computed_tokens + num_new_tokens)
        return max(num_needed - len(seq.block_table), 0)

    def _block_tokens(self, seq: Sequence, index: int) -> tuple[int, ...]:
        start = index * self.block_size
        return tuple(seq.token_ids[start : start + self.block_size])

    def _lookup(self, key: int, tokens: tuple[int, ...], parent: _BlockRef | None) -> _Block | None:
        block_id = self._hash_to_block_id.get(key)
        if block_id is None:
            return None
        block = self._blocks[block_id]
        # the hash is only an index: a hit must hold these tokens after this very parent
        if block.token_ids != tokens or block.parent != parent:
            return None
        return block

    def _advance(self, cursor: _CommitCursor, key: int, block: _Block) -> None:
        cursor.num_blocks += 1
        cursor.parent_hash = key
        cursor.parent = (block.block_id, block.generation)

    def _release_key(self, key: int) -> bool:
        """Make `key` available; False when a block in use holds it.

        A key can be taken by other tokens (a hash collision) or by a block whose parent was
        evicted meanwhile (unreachable). An unused holder is dropped from the cache.
        """
        block_id = self._hash_to_block_id.get(key)
        if block_id is None:
            return True
        block = self._blocks[block_id]
        if block.ref_count > 0:
            return False
        del self._evictable[block_id]
        del self._hash_to_block_id[key]
        block.hash, block.token_ids, block.parent = None, (), None
        self._free_block_ids.append(block_id)
        return True

    def _take_block(self) -> int:
        if self._free_block_ids:
            block = self._blocks[self._free_block_ids.pop()]
        else:
            block_id, _ = self._evictable.popitem(last=False)  # least recently released
            block = self._blocks[block_id]
            del self._hash_to_block_id[block.hash]
            self.stats.num_evictions += 1
        block.hash, block.token_ids, block.parent = None, (), None
        block.generation += 1  # children registered under the old contents no longer match
        block.ref_count = 1
        return block.block_id
