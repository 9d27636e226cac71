"""OpenAI's error envelope, and the ASGI guards that answer with it (API keys, body size, overload).

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with a fitting HTTP
status; tracebacks stay in the server log. Pydantic's 422 becomes a 400 with a one-line message.
"""

from __future__ import annotations

import hmac
import json
import logging
from collections.abc import Awaitable, Callable, Iterable
from dataclasses import dataclass, field
from typing import Any

from litedeploy.errors import LiteDeployError, RequestError

logger = logging.getLogger(__name__)

# A chat request of a whole 1M-token context is ~5 MB of JSON; anything larger is a mistake.
MAX_REQUEST_BYTES = 32 * 1024 * 1024
# Paths a client may call without an API key (load balancers probe them).
AUTH_EXEMPT_PATHS = frozenset({"/health"})
# Endpoints that start a generation and count against --max-concurrent-requests.
GENERATION_PATHS = frozenset({"/v1/chat/completions", "/v1/completions"})
_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error",
                   404: "invalid_request_error", 405: "invalid_request_error",
                   413: "invalid_request_error", 503: "server_error"}


class ServerStartError(LiteDeployError):
    """The server cannot start as asked (port taken, bad flag combination)."""


@dataclass
class APIError(Exception):
    status: int
    message: str
    param: str | None = None
    code: str | None = None
    headers: dict[str, str] = field(default_factory=dict)

    def __str__(self) -> str:
        return self.message


def error_body(status: int, message: str, param: str | None = None,
               code: str | None = None) -> dict[str, Any]:
    kind = _TYPE_BY_STATUS.get(status, "server_error" if status >= 500 else "invalid_request_error")
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}


def error_response(exc: APIError):
    from fastapi.responses import JSONResponse

    body = error_body(exc.status, exc.message, exc.param, exc.code)
    return JSONResponse(body, status_code=exc.status, headers=exc.headers or None)


def validation_message(errors: Iterable[dict[str, Any]]) -> tuple[str, str | None]:
    """Pydantic/FastAPI errors -> (one readable line, the first offending parameter)."""
    parts, first_param = [], None
    for error in errors:
        loc = [str(item) for item in error.get("loc", ()) if item != "body"]
        param = ".".join(loc) or None
        kind = error.get("type")
        if kind == "json_invalid":
            reason = (error.get("ctx") or {}).get("error", "malformed JSON")
            parts.append(f"the request body is not valid JSON ({reason} at position "
                         f"{error['loc'][-1]})")
            param = None
        elif param is None and kind in ("missing", "model_attributes_type", "dict_type"):
            parts.append("the request body must be a JSON object")
        elif kind == "extra_forbidden":
            parts.append(f"unrecognized request argument {param!r}")
        elif kind == "missing":
            parts.append(f"{param}: this field is required")
        else:
            message = str(error.get("msg", "invalid value")).removeprefix("Value error, ")
            parts.append(f"{param}: {message}" if param else message)
        first_param = first_param or param
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique) or "invalid request", first_param


def install_error_handlers(app) -> None:
    from fastapi.exceptions import RequestValidationError
    from starlette.exceptions import HTTPException

    @app.exception_handler(APIError)
    async def _api_error(_request, exc: APIError):
        return error_response(exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(_request, exc: RequestValidationError):
        message, param = validation_message(exc.errors())
        return error_response(APIError(400, message, param))

    @app.exception_handler(RequestError)
    async def _request_error(_request, exc: RequestError):
        return error_response(APIError(400, str(exc)))

    @app.exception_handler(HTTPException)
    async def _http(_request, exc: HTTPException):
        return error_response(APIError(exc.status_code, str(exc.detail),
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        logger.exception("request failed")
        return error_response(APIError(500, f"internal server error ({type(exc).__name__}); "
                                            "see the server log"))


# ---- ASGI guards ------------------------------------------------------------------------------
ASGIApp = Callable[[dict, Callable, Callable], Awaitable[None]]


async def _send_error(send: Callable, exc: APIError) -> None:
    body = json.dumps(error_body(exc.status, exc.message, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in exc.headers.items()]
    await send({"type": "http.response.start", "status": exc.status, "headers": headers})
    await send({"type": "http.response.body", "body": body})


class ApiKeyGuard:
    """`Authorization: Bearer <key>` must carry one of the keys (constant-time compare)."""

    def __init__(self, app: ASGIApp, api_keys: list[str]):
        self.app = app
        self.api_keys = [key.encode() for key in api_keys]

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] in AUTH_EXEMPT_PATHS or \
                scope["method"] == "OPTIONS":
            return await self.app(scope, receive, send)
        header = dict(scope.get("headers") or ()).get(b"authorization", b"")
        scheme, _, token = header.partition(b" ")
        valid = scheme.lower() == b"bearer" and any(
            hmac.compare_digest(token.strip(), key) for key in self.api_keys)
        if not valid:
            message = ("invalid API key: send `Authorization: Bearer <key>` with one of the "
                       "server's --api-keys" if header else
                       "missing API key: send `Authorization: Bearer <key>`")
            return await _send_error(send, APIError(401, message, code="invalid_api_key",
                                                    headers={"WWW-Authenticate": "Bearer"}))
        return await self.app(scope, receive, send)


class BodyLimitGuard:
    """Rejects request bodies over `max_bytes` with 413, counting what is actually read."""

    def __init__(self, app: ASGIApp, max_bytes: int = MAX_REQUEST_BYTES):
        self.app = app
        self.max_bytes = max_bytes

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        num_bytes = 0

        async def counted_receive() -> dict:
            nonlocal num_bytes
            message = await receive()
            num_bytes += len(message.get("body", b""))
            if num_bytes > self.max_bytes:
                from starlette.exceptions import HTTPException

                raise HTTPException(413, f"the request body is over the limit of "
                                         f"{self.max_bytes} bytes")
            return message

        return await self.app(scope, counted_receive, send)


class ConcurrencyGuard:
    """At most `max_requests` generations in flight; the next gets 503 with Retry-After."""

    def __init__(self, app: ASGIApp, max_requests: int):
        self.app = app
        self.max_requests = max_requests
        self.num_in_flight = 0

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http" or scope["path"] not in GENERATION_PATHS:
            return await self.app(scope, receive, send)
        if self.num_in_flight >= self.max_requests:
            message = (f"the server is busy: {self.num_in_flight} requests are running, the "
                       f"limit is {self.max_requests} (--max-concurrent-requests); retry later")
            return await _send_error(send, APIError(503, message, code="overloaded",
                                                    headers={"Retry-After": "1"}))
        self.num_in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.num_in_flight -= 1
