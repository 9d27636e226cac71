"""Streams behind one response: `FanOut` merges the engine streams of `n` choices, `SSEResponse`
sends them as server-sent events and closes them when the client goes away.

A streamed response holds its engine streams open; when the client disconnects the response task is
cancelled and `SSEResponse` closes every stream, aborting the requests and freeing their KV blocks.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Awaitable, Callable

from starlette.responses import StreamingResponse

from litedeploy.engine.request import RequestOutput
from litedeploy.engine.sampler import SampledToken
from litedeploy.serve.guards import QueueTicket


class FanOut:
    """Runs several engine streams at once and yields `(choice_index, output)` as they arrive.

    `start()` waits until every stream has its first output, so a request the engine rejects
    (RequestError) fails before any byte of the response is sent.
    """

    def __init__(self, streams: list[AsyncIterator[RequestOutput]],
                 tickets: list[QueueTicket] = ()):
        self.streams = streams
        self.tickets = list(tickets)  # released here too: a stream may close before it ran
        self.queue: asyncio.Queue = asyncio.Queue()
        self.tasks: list[asyncio.Task] = []
        self.primed: list[tuple[int, RequestOutput]] = []

    async def _pump(self, index: int, stream: AsyncIterator[RequestOutput]) -> None:
        try:
            async for out in stream:
                await self.queue.put((index, out))
        except Exception as exc:  # noqa: BLE001 - handed to the consumer, who reports it
            await self.queue.put((index, exc))

    async def start(self) -> None:
        self.tasks = [asyncio.create_task(self._pump(i, s)) for i, s in enumerate(self.streams)]
        waiting = set(range(len(self.streams)))
        while waiting:
            index, item = await self.queue.get()
            if isinstance(item, Exception):
                raise item
            waiting.discard(index)
            self.primed.append((index, item))

    async def __aiter__(self) -> AsyncIterator[tuple[int, RequestOutput]]:
        num_open = len(self.streams)
        items, self.primed = self.primed, []
        while num_open:
            for index, item in items:
                if isinstance(item, Exception):
                    raise item
                num_open -= item.finished
                yield index, item
            items = [await self.queue.get()] if num_open else []

    async def aclose(self) -> None:
        for task in self.tasks:
            task.cancel()
        await asyncio.gather(*self.tasks, return_exceptions=True)
        for stream in self.streams:
            await stream.aclose()
        for ticket in self.tickets:
            ticket.release()


class SSEResponse(StreamingResponse):
    """Streams until done or the client disconnects; always closes the engine streams."""

    def __init__(self, content, on_close: Callable[[], Awaitable[None]]):
        super().__init__(content, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self.on_close = on_close

    async def __call__(self, scope, receive, send) -> None:
        async def stream() -> None:
            try:
                await self.stream_response(send)
            finally:
                watcher.cancel()

        async def watch_disconnect() -> None:
            await self.listen_for_disconnect(receive)
            streamer.cancel()  # the client left: stop generating now, not at the next send

        streamer = asyncio.create_task(stream())
        watcher = asyncio.create_task(watch_disconnect())
        try:
            await asyncio.gather(streamer, watcher, return_exceptions=True)
        finally:
            streamer.cancel()
            watcher.cancel()
            await self.body_iterator.aclose()
            await self.on_close()


def sse_event(data: dict) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"


async def collect_outputs(fan: FanOut):
    """A whole non-streamed fan-out: text, logprobs and final output of each choice."""
    texts: dict[int, str] = {}
    logprobs: dict[int, list[SampledToken]] = {}
    finals: dict[int, RequestOutput] = {}
    async for index, out in fan:
        texts[index] = texts.get(index, "") + out.text
        if out.logprobs is not None:
            logprobs.setdefault(index, []).extend(out.logprobs)
        if out.finished:
            finals[index] = out
    return texts, logprobs, finals
