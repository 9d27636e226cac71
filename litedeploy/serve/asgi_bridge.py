"""One HTTP request carried from a front process to an in-process ASGI app and back, as data.

`serve ray` runs the api_server's own FastAPI app inside each engine replica. The ingress reads
the request into an `HttpCall` (plain data, so a Ray handle can pass it and a request router can
read its `routing_key`), and `call_app` plays it against the app, yielding the response start
`(status, headers)` and then body bytes. A cancelled caller becomes an `http.disconnect` that the
app sees as a client gone (so the engine aborts the request and frees its KV blocks).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

# Characters of the prompt that form the routing key: about 250 tokens, long enough that a
# shared system prompt or document is what decides, short enough to stay cheap.
ROUTING_KEY_CHARS = 1024
REPLICA_HEADER = "x-litedeploy-replica"


@dataclass
class HttpCall:
    method: str
    path: str
    query_string: bytes = b""
    headers: list[tuple[bytes, bytes]] = field(default_factory=list)
    body: bytes = b""
    routing_key: str | None = None  # the prompt's first characters (None: no prompt)
    replica_id: str | None = None  # the replica the client asked for (REPLICA_HEADER)
    client: tuple[str, int] = ("127.0.0.1", 0)  # the HTTP client's address, for the app's logs


def _message_text(content: object) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):  # OpenAI content parts
        return "".join(part.get("text", "") for part in content if isinstance(part, dict))
    return ""


def routing_key(path: str, body: bytes, num_chars: int = ROUTING_KEY_CHARS) -> str | None:
    """The first `num_chars` of the prompt of a chat or completion request; None otherwise (or
    for a body that is not JSON: the replica's app answers that one with a 400)."""
    if not path.endswith(("/chat/completions", "/completions")) or not body:
        return None
    try:
        request = json.loads(body)
    except ValueError:
        return None
    if not isinstance(request, dict):
        return None
    if isinstance(messages := request.get("messages"), list):
        text = "".join(f"{m.get('role')}:{_message_text(m.get('content'))}\n"
                       for m in messages if isinstance(m, dict))
    else:
        prompt = request.get("prompt")
        if isinstance(prompt, list) and prompt and not isinstance(prompt[0], int):
            prompt = prompt[0]  # a batch of prompts: the first decides
        text = prompt if isinstance(prompt, str) else json.dumps(prompt)
    return text[:num_chars]


def _scope(call: HttpCall) -> dict:
    return {
        "type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
        "http_version": "1.1", "method": call.method, "scheme": "http", "path": call.path,
        "raw_path": call.path.encode(), "root_path": "", "query_string": call.query_string,
        "headers": call.headers, "client": call.client, "server": ("127.0.0.1", 0),
    }


async def call_app(app, call: HttpCall,
                   extra_headers: list[tuple[bytes, bytes]] = ()) -> AsyncIterator[object]:
    """Yields `(status, headers)` once, then body chunks (bytes). Chunks that are ready together
    go out as one, so a busy replica sends fewer, larger messages."""
    messages: asyncio.Queue = asyncio.Queue()
    disconnected = asyncio.Event()
    body_sent = False

    async def receive() -> dict:
        nonlocal body_sent
        if not body_sent:
            body_sent = True
            return {"type": "http.request", "body": call.body, "more_body": False}
        await disconnected.wait()
        return {"type": "http.disconnect"}

    task = asyncio.ensure_future(app(_scope(call), receive, messages.put))
    task.add_done_callback(lambda _: messages.put_nowait(None))  # the app returned or raised
    started = False
    try:
        async for item in _responses(messages, extra_headers):
            started = True
            yield item
        if not started and task.done() and task.exception() is not None:
            raise task.exception()  # no answer at all (an answered error re-raises too: skip it)
    finally:
        disconnected.set()  # the caller left (or all was sent): the app sees a disconnect
        if not task.done():
            try:
                await asyncio.wait_for(asyncio.shield(task), timeout=5.0)
            except (asyncio.TimeoutError, asyncio.CancelledError):
                task.cancel()


async def _responses(messages: asyncio.Queue,
                     extra_headers: list[tuple[bytes, bytes]]) -> AsyncIterator[object]:
    while (message := await messages.get()) is not None:
        if message["type"] == "http.response.start":
            yield message["status"], [*message.get("headers", []), *extra_headers]
            continue
        if message["type"] != "http.response.body":
            continue
        chunk, more = message.get("body", b""), message.get("more_body", False)
        while more and not messages.empty():  # coalesce what is already waiting
            nxt = messages.get_nowait()
            if nxt is None or nxt["type"] != "http.response.body":
                messages.put_nowait(nxt)  # not ours to merge; taken by the next round
                break
            chunk += nxt.get("body", b"")
            more = nxt.get("more_body", False)
        if chunk:
            yield chunk
        if not more:
            return
