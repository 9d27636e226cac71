"""ASGI guards that answer before any route runs: API keys, body size and pace, overload, draining.

They speak raw ASGI (not FastAPI middleware) so that a rejected request costs no body read, no
JSON parse and no task beyond its own; every answer is OpenAI's error envelope.
"""

from __future__ import annotations

import asyncio
import hmac
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from litedeploy.serve.errors import APIError, error_bytes
from litedeploy.serve.inflight import InFlightRequest

# A chat request of a whole 1M-token context is ~5 MB of JSON; anything larger is a mistake.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# A client that stops sending its body for this long is dropped (a half-sent request).
BODY_READ_TIMEOUT_S = 30.0
# The whole body must arrive within this, however it trickles (a byte per read timeout would
# otherwise hold the connection for ever).
BODY_TIMEOUT_S = 60.0
# Paths a client may call without an API key (load balancers probe them).
AUTH_EXEMPT_PATHS = frozenset({"/health"})
# Endpoints that start a generation and count against the admission limits.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
# Seconds a refused client should wait; short because generations on a GPU end in seconds.
RETRY_AFTER_S = 1

ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


async def send_error(send: Callable, exc: APIError) -> None:
    body, headers = error_bytes(exc)
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def overloaded(message: str) -> APIError:
    return APIError(503, message, code="overloaded", headers={"Retry-After": str(RETRY_AFTER_S)})


class ApiKeyGuard:
    """`Authorization: Bearer <key>` must carry one of the keys, compared in constant time
    (hmac.compare_digest against every key, so timing tells neither which key nor how much of it
    matched). Keys are never logged: the rejection names no key."""

    def __init__(self, app: ASGIApp, api_keys: list[str],
                 public_paths: frozenset[str] = AUTH_EXEMPT_PATHS):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]
        self.public_paths = public_paths

    def is_valid(self, header: bytes) -> bool:
        scheme, _, token = header.partition(b" ")
        token = token.strip()
        matches = [hmac.compare_digest(token, key) for key in self.api_keys]  # no short-circuit
        return scheme.lower() == b"bearer" and any(matches)

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in self.public_paths or \
                scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        headers = [value for name, value in scope.get("headers") or () if name == b"authorization"]
        if len(headers) > 1:  # which one counts is the proxies' guess: refuse, do not pick one
            return await send_error(send, APIError(
                401, f"send one Authorization header, not {len(headers)}",
                code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"}))
        header = headers[0] if headers else b""
        if not self.is_valid(header):
            message = ("invalid API key: send `Authorization: Bearer <key>` with one of the "
                       "server's --api-keys" if header else
                       "missing API key: send `Authorization: Bearer <key>`")
            return await send_error(send, APIError(401, message, code="invalid_api_key",
                                                   headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)


class BodyLimitGuard:
    """413 for bodies over `max_bytes` (at once from Content-Length, else counting what is read);
    408 when a client stops sending its body for `read_timeout_s`, or has not sent all of it
    `body_timeout_s` after the request head."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES,
                 read_timeout_s: float = BODY_READ_TIMEOUT_S,
                 body_timeout_s: float = BODY_TIMEOUT_S):
        self.app = app
        self.max_bytes = max_bytes
        self.read_timeout_s = read_timeout_s
        self.body_timeout_s = body_timeout_s

    def too_large(self) -> APIError:
        return APIError(413, f"the request body is over the limit of {self.max_bytes} bytes "
                             "(--max-request-bytes)")

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or ()).get(b"content-length")
        if declared is not None and (not declared.isdigit() or int(declared) > self.max_bytes):
            # refuse before reading a byte of it; uvicorn then closes the connection
            return await send_error(send, self.too_large() if declared.isdigit() else APIError(
                400, "the Content-Length header is not a number"))
        num_bytes, body_done = 0, False
        deadline = time.monotonic() + self.body_timeout_s

        async def guarded_receive() -> dict:
            from starlette.exceptions import HTTPException

            nonlocal num_bytes, body_done
            if body_done:  # after the body only a disconnect can come: no deadline
                return await receive()
            left_s = deadline - time.monotonic()
            try:
                message = await asyncio.wait_for(receive(), max(0.0, min(self.read_timeout_s,
                                                                         left_s)))
            except TimeoutError:
                if left_s < self.read_timeout_s:
                    raise HTTPException(408, f"the whole request body must arrive within "
                                             f"{self.body_timeout_s:g} s") from None
                raise HTTPException(408, f"the request body did not arrive within "
                                         f"{self.read_timeout_s:g} s") from None
            num_bytes += len(message.get("body", b""))
            body_done = message["type"] != "http.request" or not message.get("more_body")
            if num_bytes > self.max_bytes:
                raise HTTPException(413, self.too_large().message)
            return message

        return await self.app(scope, guarded_receive, send)


@dataclass
class Admission:
    """What the server accepts now: generations in flight, requests queued for their first token,
    and whether it is draining for a shutdown. One event loop touches it: no lock."""

    max_in_flight: int | None = None
    max_queued: int | None = None
    num_in_flight: int = 0
    num_queued: int = 0
    draining: bool = False
    requests: set[InFlightRequest] = field(default_factory=set, repr=False)

    def cancel_all(self) -> None:
        """The drain deadline: end every generation in flight (each answers its client)."""
        for request in list(self.requests):
            request.cancel_for_shutdown()

    def check_queue(self) -> None:
        """Raises 503 when the queue of requests waiting for their first token is full."""
        if self.max_queued is not None and self.num_queued >= self.max_queued:
            raise overloaded(f"the server is busy: {self.num_queued} requests are waiting for "
                             f"their first token, the limit is {self.max_queued} "
                             "(--max-waiting-requests); retry later")


class QueueTicket:
    """One engine stream's place in the queue: counted from creation until its first output or
    its end, whichever comes first; `release` is idempotent."""

    def __init__(self, admission: Admission):
        self.admission = admission
        self.held = True
        admission.num_queued += 1

    def release(self) -> None:
        if self.held:
            self.held = False
            self.admission.num_queued -= 1


class AdmissionGuard:
    """Counts generations in flight; answers 503 + Retry-After past the limit or while draining.
    Each runs as an `InFlightRequest`: cancelled when its client hangs up before the response."""

    def __init__(self, app: ASGIApp, admission: Admission):
        self.app = app
        self.admission = admission

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        state = self.admission
        if state.draining:
            return await send_error(send, overloaded(
                "the server is shutting down and takes no new requests; retry on another "
                "replica or after the restart"))
        if state.max_in_flight is not None and state.num_in_flight >= state.max_in_flight:
            return await send_error(send, overloaded(
                f"the server is busy: {state.num_in_flight} requests are running, the limit is "
                f"{state.max_in_flight} (--max-concurrent-requests); retry later"))
        state.num_in_flight += 1
        request = InFlightRequest(self.app, scope, receive, send, RETRY_AFTER_S)
        state.requests.add(request)
        try:
            await request.run()
        finally:
            state.requests.discard(request)
            state.num_in_flight -= 1
