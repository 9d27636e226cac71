"""Debug endpoints (only with --enable-debug-endpoints): the state a leak test compares, and a
one-shot fault injected into the next engine step.

The state is what the engine thread publishes after every step (`AsyncEngine.state`, with the
block integrity check when idle), so it answers at once even during a long prefill. The fault is
armed on the engine thread (`AsyncEngine.call`), between two steps.
"""

from __future__ import annotations

import asyncio
from typing import TYPE_CHECKING

from fastapi import FastAPI

from litedeploy.engine.engine import LLMEngine

if TYPE_CHECKING:
    from litedeploy.serve.state import OpenAIServer


class InjectedFault(RuntimeError):
    """Raised by the next model forward after POST /debug/fail_next_step."""


def arm_fault(engine: LLMEngine) -> None:
    """The next `runner.run` raises once; the engine's own error path (`_fail_batch`) then fails
    exactly the requests of that step."""
    runner = engine.runner

    def failing_run(*args, **kwargs):
        del runner.run  # one shot: the class's method is back for the next step
        raise InjectedFault("fault injected by POST /debug/fail_next_step")

    runner.run = failing_run


def add_debug_routes(app: FastAPI, server: OpenAIServer) -> None:
    server.engine.check_integrity_when_idle = True

    @app.get("/debug/state")
    async def state() -> dict[str, object]:
        result = dict(server.engine.state)
        admission = server.admission
        result.update(num_asyncio_tasks=len(asyncio.all_tasks()),
                      num_in_flight=admission.num_in_flight, num_queued=admission.num_queued,
                      draining=admission.draining)
        return result

    @app.post("/debug/fail_next_step")
    async def fail_next_step() -> dict[str, bool]:
        await server.engine.call(arm_fault)
        return {"armed": True}
