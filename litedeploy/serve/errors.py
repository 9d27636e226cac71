"""OpenAI's error envelope: the one shape of every error a client sees.

Every error a client sees is `{"error": {"message", "type", "param", "code"}}` with a fitting HTTP
status; tracebacks stay in the server log. Pydantic's 422 becomes a 400 with a one-line message.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

from litedeploy.errors import LiteDeployError, RequestError

logger = logging.getLogger(__name__)

_TYPE_BY_STATUS = {400: "invalid_request_error", 401: "invalid_request_error",
                   404: "invalid_request_error", 405: "invalid_request_error",
                   408: "invalid_request_error", 413: "invalid_request_error",
                   503: "server_error"}


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


def body_parse_message(cause: BaseException) -> str:
    if isinstance(cause, UnicodeDecodeError):
        return f"the request body is not valid UTF-8 (byte {cause.start}); send UTF-8 JSON"
    if isinstance(cause, RecursionError):
        return "the request body nests JSON too deeply to parse"
    return f"the request body could not be parsed ({type(cause).__name__})"


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
        message = str(exc.detail)
        if exc.status_code == 400 and exc.__cause__ is not None:  # FastAPI's body parse failure
            message = body_parse_message(exc.__cause__)
        return error_response(APIError(exc.status_code, message,
                                       headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _crash(_request, exc: Exception):
        logger.exception("request failed")
        return error_response(APIError(500, f"internal server error ({type(exc).__name__}); "
                                            "see the server log"))


def error_bytes(exc: APIError) -> tuple[bytes, list[tuple[bytes, bytes]]]:
    """The envelope as raw ASGI body and headers, for guards that answer before FastAPI."""
    body = json.dumps(error_body(exc.status, exc.message, exc.param, exc.code)).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    headers += [(key.lower().encode(), value.encode()) for key, value in exc.headers.items()]
    return body, headers
