"""One generation request in flight, seen from the ASGI layer: it ends when its client hangs up
before the response starts, and at a shutdown's drain deadline.

A request waiting for its first token (queued, or prefilling) sends nothing, so nothing in the app
reads from the connection and a client that hangs up would keep its slot and its place in the
engine until the first token. Here the app's `receive` is wrapped: once the body is in, a watcher
task waits for `http.disconnect`, and the app's own later reads (Starlette's disconnect checks)
see that same event. Cancelling the app task runs the handlers' cleanup, which aborts the engine
requests and frees their KV blocks.

At the drain deadline every request is cancelled the same way and answered here: a 503 in
OpenAI's envelope when no byte was sent yet, else a closing error event and `[DONE]` on a stream.
"""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import Awaitable, Callable

from litedeploy.serve.errors import APIError, error_body, error_bytes

logger = logging.getLogger(__name__)

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]
SHUTDOWN_MESSAGE = ("the server shut down before this request finished (drain timeout); retry "
                    "on another replica or after the restart")
_HUNG_UP = "hung up"
_SHUTDOWN = "shutdown"


class InFlightRequest:
    def __init__(self, app: ASGIApp, scope: dict, receive: Callable, send: Callable,
                 retry_after_s: int = 1):
        self.app, self.scope, self.receive, self.send = app, scope, receive, send
        self.retry_after_s = retry_after_s
        self.disconnected = asyncio.Event()
        self.response_started = False
        self.response_complete = False
        self.is_event_stream = False
        self._body_done = False
        self._cancel_reason: str | None = None
        self._task: asyncio.Task | None = None
        self._watcher: asyncio.Task | None = None

    @property
    def name(self) -> str:
        client = self.scope.get("client") or ("?", 0)
        return f"{self.scope.get('method')} {self.scope.get('path')} from {client[0]}:{client[1]}"

    async def run(self) -> None:
        task = self._task = asyncio.create_task(self.app(self.scope, self._app_receive,
                                                         self._app_send))
        hang_up = asyncio.create_task(self.disconnected.wait())
        try:
            await asyncio.wait({task, hang_up}, return_when=asyncio.FIRST_COMPLETED)
            if not task.done() and not self.response_started:
                # after the response started the app watches the client itself (SSE, collect)
                logger.info("%s: the client hung up before the response; cancelled", self.name)
                self._cancel(_HUNG_UP)
            await asyncio.wait({task})  # our own cancellation raises here, the app's does not
        finally:
            hang_up.cancel()
            if self._watcher is not None:
                self._watcher.cancel()
            if not task.done():
                task.cancel()
        if not task.cancelled():
            return task.result()  # the app's own exception, if any, goes on up
        if self._cancel_reason is None:
            raise asyncio.CancelledError  # cancelled by someone else: not ours to answer
        if self._cancel_reason == _SHUTDOWN:
            await self._answer_shutdown()
        return None

    def cancel_for_shutdown(self) -> None:
        self._cancel(_SHUTDOWN)

    def _cancel(self, reason: str) -> None:
        if self._task is not None and not self._task.done() and self._cancel_reason is None:
            self._cancel_reason = reason
            self._task.cancel()

    async def _answer_shutdown(self) -> None:
        logger.warning("%s: cancelled by the shutdown (drain timeout)", self.name)
        try:
            if not self.response_started:
                body, headers = error_bytes(APIError(
                    503, SHUTDOWN_MESSAGE, code="shutting_down",
                    headers={"Retry-After": str(self.retry_after_s)}))
                await self.send({"type": "http.response.start", "status": 503,
                                 "headers": headers})
                await self.send({"type": "http.response.body", "body": body})
            elif not self.response_complete:
                tail = b""
                if self.is_event_stream:
                    event = json.dumps(error_body(503, SHUTDOWN_MESSAGE, code="shutting_down"))
                    tail = f"data: {event}\n\ndata: [DONE]\n\n".encode()
                await self.send({"type": "http.response.body", "body": tail, "more_body": False})
        except OSError:
            pass  # the client left meanwhile: nothing to tell it

    # ---- what the app sees ------------------------------------------------------------------
    async def _app_receive(self) -> dict:
        if self._body_done:  # only a disconnect can come now; the watcher reads it
            await self.disconnected.wait()
            return {"type": "http.disconnect"}
        message = await self.receive()
        if message["type"] == "http.disconnect":
            self._body_done = True
            self.disconnected.set()
        elif not message.get("more_body", False):
            self._body_done = True
            self._watcher = asyncio.create_task(self._watch())
        return message

    async def _watch(self) -> None:
        while (await self.receive())["type"] != "http.disconnect":
            pass
        self.disconnected.set()

    async def _app_send(self, message: dict) -> None:
        if message["type"] == "http.response.start":
            self.response_started = True
            content_type = dict(message.get("headers") or ()).get(b"content-type", b"")
            self.is_event_stream = content_type.startswith(b"text/event-stream")
        elif message["type"] == "http.response.body" and not message.get("more_body", False):
            self.response_complete = True
        await self.send(message)
