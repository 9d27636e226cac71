"""Heartbeats between tensor-parallel ranks, so a lost rank ends every rank within seconds.

A collective waits for a dead peer for as long as its timeout (NCCL: 10 minutes and more), and an
idle rank enters none at all. So each rank bumps its own counter in the rendezvous store (node
0's TCPStore) every INTERVAL_S and watches everyone's counters: a counter that has not moved for
`timeout_s` of this rank's own clock, or a store that is gone, is a lost rank.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from datetime import timedelta

import torch.distributed as dist

INTERVAL_S = 0.5
# a store that vanished is rank 0's exit: wait this long for the "stop" that precedes an
# orderly one before calling it a loss
STORE_GRACE_S = 2.0


class Liveness:
    def __init__(self, master_addr: str, master_port: int, rank: int, world_size: int,
                 timeout_s: float, describe: Callable[[int], str],
                 on_lost: Callable[[str], None]):
        self.addr, self.port = master_addr, master_port
        self.rank, self.world_size = rank, world_size
        self.timeout_s = timeout_s
        self.describe = describe  # rank -> "rank 3 (node 1)"
        self.on_lost = on_lost  # called once, from the heartbeat thread, with one line
        self._stopped = threading.Event()
        # one launch's keys: torchrun's agent store outlives a restarted group of workers
        self._prefix = "litedeploy/heartbeat/{}/{}/".format(
            os.environ.get("TORCHELASTIC_RUN_ID", ""),
            os.environ.get("TORCHELASTIC_RESTART_COUNT", "0"))
        self._thread = threading.Thread(target=self._run, name="litedeploy-tp-heartbeat",
                                        daemon=True)

    def start(self) -> Liveness:
        self._thread.start()
        return self

    def stop(self) -> None:
        """An orderly shutdown begins: ranks leaving from now on are not lost."""
        self._stopped.set()

    def _run(self) -> None:
        try:
            # its own client: the process group's store may be busy, and has a long timeout
            store = dist.TCPStore(self.addr, self.port, is_master=False, wait_for_workers=False,
                                  timeout=timedelta(seconds=self.timeout_s))
        except Exception as exc:  # noqa: BLE001 - reported as the loss it is
            self._lose(f"cannot reach the rendezvous store at {self.addr}:{self.port}: "
                       f"{_first_line(exc)}")
            return
        keys = [f"{self._prefix}{rank}" for rank in range(self.world_size)]
        counts = [-1] * self.world_size
        seen_at = [time.monotonic()] * self.world_size
        while not self._stopped.wait(INTERVAL_S):
            try:
                store.add(keys[self.rank], 1)
                latest = [store.add(key, 0) for key in keys]  # add 0 = read, never blocks
            except Exception as exc:  # noqa: BLE001 - the store's host is gone
                if not self._stopped.wait(STORE_GRACE_S):
                    self._lose(f"lost the rendezvous store at {self.addr}:{self.port} (rank 0 "
                               f"is gone): {_first_line(exc)}")
                return
            now = time.monotonic()
            for rank, count in enumerate(latest):
                if count != counts[rank]:
                    counts[rank], seen_at[rank] = count, now
            late = [rank for rank in range(self.world_size) if now - seen_at[rank] > self.timeout_s]
            if late:
                self._lose(f"tensor-parallel {self.describe(late[0])} is lost: no heartbeat "
                           f"for {self.timeout_s:g} s")
                return

    def _lose(self, message: str) -> None:
        if not self._stopped.is_set():
            self.on_lost(message)


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0][:300] if text else type(exc).__name__
