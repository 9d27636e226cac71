"""Rank 0's side of tensor parallelism: it runs the scheduler and broadcasts every step to the
other ranks (ranks.py), which run the same forward on their shard of the model and KV cache.
Where the ranks run (one host, --nnodes, torchrun) is launch.py's.
"""

from __future__ import annotations

import atexit
import logging
import os
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import replace

import torch.distributed as dist

from litedeploy.config import EngineConfig
from litedeploy.distributed.launch import RankLayout, resolve_layout
from litedeploy.distributed.parallel_state import destroy_tensor_parallel
from litedeploy.distributed.ranks import (
    DESTROY_TIMEOUT_S,
    check_split,
    check_tp,
    gather_free_memory,
    join_children,
    join_group,
    rank_device,
    release_cuda_graphs,
    serve_ranks,
    spawn_local_ranks,
)

__all__ = ["WorkerGroup", "release_cuda_graphs", "start_workers"]

logger = logging.getLogger(__name__)

# rank 0, having lost a rank: time for the failed step's error to reach HTTP clients
LOST_GRACE_S = 1.5


def start_workers(model_path: str, config: EngineConfig) -> tuple[WorkerGroup, EngineConfig]:
    """Check the split first (so a bad --tp is one clear error, not N crashed processes), then
    start this node's other ranks and join the group as rank 0. Returns rank 0's engine config.

    A process that is not rank 0 (a torchrun rank > 0, --node-rank > 0) serves its ranks here
    and then ends: `pipeline()` / `from_pretrained` return only on rank 0."""
    layout = resolve_layout(config)
    assert layout is not None, "start_workers needs --tp > 1 or torchrun"
    if layout.rank != 0:
        serve_ranks(model_path, config, layout)  # does not return
    check_tp(config, layout)
    check_split(model_path, config.tp)
    workers = WorkerGroup(model_path, config, layout)
    return workers, replace(config, device=rank_device(config, layout.local_rank))


class WorkerGroup:
    """Rank 0's handle on the other ranks: its own node's child processes, and the ranks of
    other nodes it reaches only through the process group."""

    def __init__(self, model_path: str, config: EngineConfig, layout: RankLayout):
        self.layout = layout
        self.world_size = layout.world_size
        self.processes = spawn_local_ranks(model_path, config, layout)
        self._closing = False
        self._lost_once = threading.Lock()
        self.before_close: list[Callable[[], None]] = []  # rank 0's own teardown steps
        atexit.register(self.close)
        threading.Thread(target=self._watch, name="litedeploy-tp-watchdog", daemon=True).start()
        self.control, self.liveness = join_group(config, layout, layout.local_rank, self._lost)

    def call(self, method: str, *args) -> None:
        """Every worker runs `method(*args)` (see `_Worker`); rank 0 then does its own part.

        Anything that runs a collective (a forward, a graph capture, a gather) must go through
        here first: a collective that rank 0 enters alone waits forever for the others."""
        dist.broadcast_object_list([(method, args)], src=0, group=self.control)

    def min_free_memory(self, cap_bytes: int | None, own_free_bytes: int) -> int:
        """The least free memory of any rank: every rank's cache has the same number of
        blocks, so the fullest GPU decides (another process may be using one of them)."""
        self.call("report_free_memory", cap_bytes)
        return min(gather_free_memory(own_free_bytes, self.control))

    def close(self) -> None:
        if self._closing:
            return
        self._closing = True
        if getattr(self, "liveness", None) is not None:
            self.liveness.stop()  # the ranks leave now, on purpose
        for step in self.before_close:  # rank 0 frees its CUDA graphs, as the workers do
            step()
        try:
            self.call("stop")
        except Exception as exc:  # noqa: BLE001 - workers may be gone already
            logger.debug("stop not sent to every rank: %s", exc)
        # while the workers destroy theirs: NCCL's teardown waits for every rank
        if not destroy_tensor_parallel(timeout_s=DESTROY_TIMEOUT_S):
            logger.warning("the tensor-parallel process group did not shut down within %g s",
                           DESTROY_TIMEOUT_S)
        join_children(self.processes)

    def _lost(self, message: str) -> None:
        """A rank is gone: say so in one line, let the step in flight fail its requests (their
        clients get an error), then exit non-zero: the group cannot step without it."""
        if self._closing or not self._lost_once.acquire(blocking=False):
            return
        print(f"litedeploy: error: {message}; shutting down", file=sys.stderr, flush=True)
        if dist.is_initialized() and dist.get_backend() == "nccl":
            # a step waiting in an NCCL collective for the lost rank waits on; aborting the
            # communicators makes it raise, so its requests end with an error (gloo raises by
            # itself once the peer's sockets close). Its own thread: an abort may block too.
            threading.Thread(target=_abort_nccl, name="litedeploy-tp-abort", daemon=True).start()
        time.sleep(LOST_GRACE_S)
        os._exit(1)

    def _watch(self) -> None:
        # A dead local worker is seen at once here (a remote one through the heartbeats)
        while not self._closing:
            for process in self.processes:
                if process.exitcode is not None and not self._closing:
                    self._lost(f"tensor-parallel worker {process.name} died (exit code "
                               f"{process.exitcode})")
            time.sleep(0.2)


def _abort_nccl() -> None:
    try:
        dist.distributed_c10d._abort_process_group()  # experimental, NCCL only
    except Exception as exc:  # noqa: BLE001 - best effort: the process exits after the grace
        logger.debug("aborting the NCCL communicators failed: %s", exc)
