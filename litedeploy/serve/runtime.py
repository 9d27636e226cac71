"""uvicorn, hardened: slow or silent clients are cut off, and SIGTERM drains before exiting.

- `timed_h11_protocol`: uvicorn times out idle keep-alive connections but not a client that
  connects and never sends (or trickles) its request head; this protocol closes those after
  `head_timeout_s`. A body that stops arriving is `BodyLimitGuard`'s job (408).
- `DrainingServer`: the first SIGTERM stops admitting generations (503 + Retry-After, /health 503),
  lets those in flight finish for up to `drain_timeout_s`, then cancels the rest (each answers its
  client: a 503 envelope, or an error event and [DONE] on a stream), shuts down and exits 0. A
  second SIGTERM or a SIGINT stops at once (uvicorn's own behaviour).
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import time
from typing import NoReturn

import uvicorn
from uvicorn.protocols.http.h11_impl import H11Protocol

from litedeploy.serve.guards import Admission

logger = logging.getLogger(__name__)

DRAIN_POLL_S = 0.1
# After the drain deadline, how long cancelled requests may take to send their last bytes.
CANCEL_GRACE_S = 5.0


def timed_h11_protocol(head_timeout_s: float) -> type[H11Protocol]:
    class TimedH11Protocol(H11Protocol):
        """Closes a connection whose next request head is not complete within the timeout."""

        _head_timer: asyncio.TimerHandle | None = None

        def _arm_head_timer(self) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            self._head_timer = self.loop.call_later(head_timeout_s, self._on_head_timeout)

        def _awaiting_head(self) -> bool:
            return self.cycle is None or self.cycle.response_complete

        def _on_head_timeout(self) -> None:
            if self._awaiting_head() and not self.transport.is_closing():
                logger.info("closing a connection that sent no request head in %g s",
                            head_timeout_s)
                self.transport.close()

        def connection_made(self, transport) -> None:
            super().connection_made(transport)
            self._arm_head_timer()

        def handle_events(self) -> None:
            super().handle_events()
            if self._head_timer is not None and not self._awaiting_head():
                self._head_timer.cancel()

        def on_response_complete(self) -> None:
            super().on_response_complete()
            if not self.transport.is_closing():
                self._arm_head_timer()  # the next request on this connection gets a deadline too

        def connection_lost(self, exc: Exception | None) -> None:
            if self._head_timer is not None:
                self._head_timer.cancel()
            super().connection_lost(exc)

    return TimedH11Protocol


def exit_now(code: int) -> NoReturn:
    """Exit while the engine thread is still inside a step: a normal interpreter exit would tear
    down torch's thread pools under it and abort ("terminate called without an active
    exception", exit -6); os._exit skips that teardown."""
    logger.warning("the engine step in progress outlived the drain timeout; exiting without it")
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, admission: Admission, drain_timeout_s: float):
        super().__init__(config)
        self.admission = admission
        self.drain_timeout_s = drain_timeout_s
        self._loop: asyncio.AbstractEventLoop | None = None
        self._drain_task: asyncio.Task | None = None

    async def serve(self, sockets=None) -> None:
        self._loop = asyncio.get_running_loop()
        await super().serve(sockets)

    def handle_exit(self, sig: int, frame) -> None:
        if sig == signal.SIGTERM and self._loop is not None and not self.should_exit:
            if self.admission.draining:  # a second SIGTERM: stop now
                self.should_exit = True
                return
            # not recorded in uvicorn's captured signals, so the process exits 0 afterwards
            self.admission.draining = True
            self._loop.call_soon_threadsafe(self._start_drain)
            return
        super().handle_exit(sig, frame)

    def _start_drain(self) -> None:
        self._drain_task = asyncio.ensure_future(self._drain())

    async def _drain(self) -> None:
        num_at_start = self.admission.num_in_flight
        logger.warning("SIGTERM: draining %d request(s) in flight (up to %g s), refusing new ones",
                       num_at_start, self.drain_timeout_s)
        deadline = time.monotonic() + self.drain_timeout_s
        while self.admission.num_in_flight and time.monotonic() < deadline:
            await asyncio.sleep(DRAIN_POLL_S)
        if self.admission.num_in_flight:
            logger.warning("drain timeout: aborting %d request(s) still in flight",
                           self.admission.num_in_flight)
            self.admission.cancel_all()
            deadline = time.monotonic() + CANCEL_GRACE_S
            while self.admission.num_in_flight and time.monotonic() < deadline:
                await asyncio.sleep(DRAIN_POLL_S / 10)
        self.should_exit = True
