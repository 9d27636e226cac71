"""One request's token state as the scheduler and block manager see it.

Pure Python on purpose: the scheduler deals in token counts only (see DESIGN.md). Everything the
engine needs besides tokens (sampling params, output queue, detokenizer) rides in `payload`.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field
from typing import Any


class SequenceStatus(enum.Enum):
    WAITING = enum.auto()
    RUNNING = enum.auto()
    FINISHED = enum.auto()


@dataclass(eq=False)  # identity equality: two requests with the same tokens are still two requests
class Sequence:
    seq_id: int
    token_ids: list[int]  # prompt + generated so far
    num_prompt_tokens: int
    max_new_tokens: int  # already resolved by the engine
    num_computed_tokens: int = 0  # tokens whose K/V are in the cache
    num_cached_tokens: int = 0  # prompt tokens found in the prefix cache at the last admission
    block_table: list[int] = field(default_factory=list)
    status: SequenceStatus = SequenceStatus.WAITING
    arrival_index: int = 0  # set by Scheduler.add; preemption picks the highest
    num_preemptions: int = 0
    # every prompt position must be computed (prompt logprobs): no prefix-cache hits
    skip_prefix_cache: bool = False
    payload: Any = None  # engine-side request state; the scheduler never looks at it

    def __post_init__(self) -> None:
        assert 0 <= self.num_prompt_tokens <= len(self.token_ids), (
            f"seq {self.seq_id}: num_prompt_tokens={self.num_prompt_tokens} but "
            f"{len(self.token_ids)} token ids"
        )

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def num_generated_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def last_token_id(self) -> int:
        return self.token_ids[-1]

    @property
    def is_finished(self) -> bool:
        return self.status is SequenceStatus.FINISHED

    def append_token(self, token_id: int) -> None:
        self.token_ids.append(token_id)
