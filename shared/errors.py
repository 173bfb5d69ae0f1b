"""Named errors and the one place that turns them into OpenAI-shaped HTTP responses.

Inner code raises an :class:`ApiError` subclass; :func:`install_error_handlers` is the only
code that builds an error body: ``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from redis.exceptions import RedisError, ResponseError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.requests import ClientDisconnect
from starlette.responses import Response

logger = logging.getLogger(__name__)

# Values from the request echoed in a message are cut to this; whole messages to _MESSAGE_MAX.
_ECHO_MAX = 64
_MESSAGE_MAX = 1024


def clip(value: object, limit: int = _ECHO_MAX) -> str:
    """``value`` as text for an error message, cut short: a client's 10,000-character model
    name is not sent back to it (or written to a log) whole."""
    text = str(value)
    return text if len(text) <= limit else f"{text[:limit]}…({len(text)} chars)"


class ApiError(Exception):
    status = 500
    type = "internal_error"
    code = "internal_error"

    def __init__(
        self,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message)
        self.message = message
        self.param = param
        if code is not None:
            self.code = code
        self.headers = headers or {}


class BadRequest(ApiError):
    status, type, code = 400, "invalid_request_error", "invalid_request"


class Unauthorized(ApiError):
    status, type, code = 401, "authentication_error", "invalid_api_key"


class NotFound(ApiError):
    status, type, code = 404, "invalid_request_error", "not_found"


class ModelNotFound(NotFound):
    code = "model_not_found"


class Conflict(ApiError):
    status, type, code = 409, "invalid_request_error", "conflict"


class PayloadTooLarge(ApiError):
    status, type, code = 413, "invalid_request_error", "request_too_large"


class NoCapacity(ApiError):
    """No replica can serve now; ``retry_after_s`` goes to the Retry-After header."""

    status, type, code = 503, "service_unavailable", "no_replica"

    def __init__(self, message: str, *, retry_after_s: int = 5, code: str | None = None) -> None:
        retry = str(max(1, retry_after_s))
        super().__init__(message, code=code, headers={"Retry-After": retry})


class QueueFull(ApiError):
    status, type, code = 429, "rate_limit_error", "queue_full"

    def __init__(self, message: str, *, retry_after_s: int = 5) -> None:
        super().__init__(message, headers={"Retry-After": str(max(1, retry_after_s))})


class RateLimited(ApiError):
    """Over an API key's (or its tenant's) limit; OpenAI's code, type and headers."""

    status, type, code = 429, "requests", "rate_limit_exceeded"

    def __init__(self, message: str, *, kind: str, headers: dict[str, str]) -> None:
        super().__init__(message, headers=headers)
        self.type = kind  # "requests" or "tokens", as OpenAI says which limit was hit


class StoreUnavailable(ApiError):
    status, type, code = 503, "service_unavailable", "store_unavailable"


class StoreCorrupt(ApiError):
    """A Redis key holds something the pool did not write (wrong type): nothing was changed."""

    status, type, code = 500, "internal_error", "store_corrupt"


class UpstreamError(ApiError):
    status, type, code = 502, "upstream_error", "upstream_error"


class UpstreamTimeout(ApiError):
    status, type, code = 504, "upstream_error", "upstream_timeout"


def error_body(
    message: str, type_: str, code: str | int | None, param: str | None = None
) -> bytes:
    if len(message) > _MESSAGE_MAX:  # the net under every message that echoes input
        message = clip(message, _MESSAGE_MAX)
    if param is not None and len(param) > _ECHO_MAX:
        param = clip(param)
    err = {"message": message, "type": type_, "param": param, "code": code}
    return orjson.dumps({"error": err})


def sse_error(err: ApiError) -> bytes:
    """An error inside an event stream that has already begun (its status line is sent):
    one event carrying the error body, which OpenAI clients raise."""
    return b"data: " + error_body(err.message, err.type, err.code, err.param) + b"\n\n"


def error_response(err: ApiError) -> Response:
    return Response(
        error_body(err.message, err.type, err.code, err.param),
        status_code=err.status,
        media_type="application/json",
        headers=err.headers,
    )


_HTTP_TYPES = {401: Unauthorized, 404: NotFound, 413: PayloadTooLarge}


async def _api_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, ApiError)
    return error_response(exc)


async def _validation_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    errors: list[Any] = list(exc.errors())
    first = errors[0] if errors else {}
    loc = [str(p) for p in first.get("loc", ()) if p != "body"]
    msg = str(first.get("msg", "invalid request"))
    message = f"{'.'.join(loc)}: {msg}" if loc else msg
    return error_response(BadRequest(message, param=".".join(loc) or None))


async def _http_error(_: Request, exc: Exception) -> Response:
    assert isinstance(exc, StarletteHTTPException)
    cls = _HTTP_TYPES.get(exc.status_code)
    if cls is not None:
        return error_response(cls(str(exc.detail)))
    err = ApiError(str(exc.detail))
    err.status = exc.status_code
    err.type = "invalid_request_error" if exc.status_code < 500 else "internal_error"
    err.code = "method_not_allowed" if exc.status_code == 405 else str(exc.status_code)
    return error_response(err)


# Redis answered, but about the data (not its health): reported as such, not "unavailable".
# redis-py drops an error's "ERR " code from its message; one raised inside a script keeps it.
_DATA_ERRORS = ("WRONGTYPE", "value is not", "hash value is not")


def is_data_error(exc: BaseException) -> bool:
    """Redis answered about the data (a key of the wrong type, a field that is not a
    number), not about its health."""
    return isinstance(exc, ResponseError) and \
        str(exc).removeprefix("ERR ").startswith(_DATA_ERRORS)


def store_error(exc: Exception) -> ApiError:
    """The API error for a Redis failure: corrupt data when Redis answered about the data,
    else unavailable."""
    if is_data_error(exc):
        # Redis answered, with an error: a key holds something the pool did not write.
        logger.warning("redis refused a command: %s", exc)
        return StoreCorrupt(f"the pool's state store refused a command ({exc}); "
                            "a key may hold the wrong type (see docs/redis.md)")
    logger.warning("redis unavailable: %s", exc)
    return StoreUnavailable("the pool's state store (Redis) is unavailable; retry")


async def _redis_error(_: Request, exc: Exception) -> Response:
    return error_response(store_error(exc))


async def _client_gone(_: Request, exc: Exception) -> Response:
    # The client left (or was cut for a slow body) before its body was read: nobody reads an
    # answer, and it is no error of ours to log with a traceback.
    return Response(status_code=499)  # nginx's code, for whoever counts


async def _unexpected(_: Request, exc: Exception) -> Response:
    logger.exception("unhandled error", exc_info=exc)
    return error_response(ApiError("internal error"))


Handler = Callable[[Request, Exception], Awaitable[Response]]


def _with_request_id(handler: Handler) -> Handler:
    """An error answer carries the request's id too, once a route has set
    ``request.state.request_id`` (the OpenAI routes and the worker's proxy do)."""

    async def handle(request: Request, exc: Exception) -> Response:
        response = await handler(request, exc)
        rid = getattr(request.state, "request_id", None)
        if rid:
            response.headers["x-request-id"] = rid
        return response

    return handle


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(ApiError, _with_request_id(_api_error))
    app.add_exception_handler(RequestValidationError, _with_request_id(_validation_error))
    app.add_exception_handler(StarletteHTTPException, _with_request_id(_http_error))
    app.add_exception_handler(RedisError, _with_request_id(_redis_error))
    app.add_exception_handler(ClientDisconnect, _with_request_id(_client_gone))
    app.add_exception_handler(Exception, _with_request_id(_unexpected))
