"""HTTP edge helpers shared by the three services: auth, bounded bodies, JSON, relaying."""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any, TypeVar

import httpx
import orjson
import uvicorn
from fastapi import FastAPI, Request
from pydantic import BaseModel, ValidationError
from starlette.requests import ClientDisconnect
from starlette.responses import Response

from shared import edge, fastlane
from shared.edge import Limits
from shared.errors import BadRequest, PayloadTooLarge, Unauthorized
from shared.fastlane import Picker

M = TypeVar("M", bound=BaseModel)
T = TypeVar("T")

def bearer_ok(header: bytes, expected: bytes) -> bool:
    """Whether an Authorization header value carries the bearer token ``expected``. Bytes on
    both sides: any byte a client sends is a wrong token (401), never an error."""
    scheme, _, given = header.partition(b" ")
    return scheme.lower() == b"bearer" and hmac.compare_digest(given.strip(), expected)


def bearer_guard(*tokens: str | None) -> Callable[[Request], Awaitable[None]]:
    """A dependency that requires ``Authorization: Bearer <token>``, one of ``tokens``, when
    any is set (unset ones are skipped; none set: open)."""
    expected = [t.encode() for t in tokens if t]

    async def check(request: Request) -> None:
        if not expected:
            return
        # Starlette decodes header bytes as latin-1, so this gives back the bytes sent.
        header = request.headers.get("authorization", "").encode("latin-1")
        if not any([bearer_ok(header, e) for e in expected]):
            raise Unauthorized("missing or invalid bearer token")

    return check


def auth_headers(token: str | None) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"} if token else {}


async def read_body(request: Request, limit: int) -> bytes:
    """The request body, refusing more than ``limit`` bytes before reading them all."""
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise PayloadTooLarge(f"request body is larger than {limit} bytes")
    chunks: list[bytes] = []
    size = 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise PayloadTooLarge(f"request body is larger than {limit} bytes")
        chunks.append(chunk)
    return b"".join(chunks)


def parse_object(body: bytes) -> dict[str, Any]:
    try:
        data = orjson.loads(body)
    except orjson.JSONDecodeError as e:
        raise BadRequest(f"request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise BadRequest("request body must be a JSON object")
    return data


def invalid(e: ValidationError) -> BadRequest:
    """A 400 that names the first invalid field and says why (never pydantic's link alone)."""
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return BadRequest(f"{loc}: {msg}" if loc else msg, param=loc or None)


def parse_as(cls: type[M], data: Any) -> M:
    try:
        return cls.model_validate(data)
    except ValidationError as e:
        raise invalid(e) from None


async def parse_body(request: Request, cls: type[M], limit: int) -> M:
    return parse_as(cls, parse_object(await read_body(request, limit)))


def json_response(data: Any, status: int = 200) -> Response:
    return Response(orjson.dumps(data), status_code=status, media_type="application/json")


def make_client(connect_timeout_s: float, read_timeout_s: float) -> httpx.AsyncClient:
    """One pooled client per process, keep-alive on."""
    return httpx.AsyncClient(
        timeout=httpx.Timeout(read_timeout_s, connect=connect_timeout_s),
        limits=httpx.Limits(max_connections=1000, max_keepalive_connections=200),
    )


def serve(app: FastAPI, host: str, port: int, limits: Limits, fast: Picker | None = None,
          sock: socket.socket | None = None) -> None:
    """Run ``app`` with uvicorn behind the edge ``limits`` (:mod:`shared.edge`); ``fast``
    picks the requests served on the fast lane; ``sock``: a listening socket to serve
    instead of binding ``host``:``port`` (a router process under its supervisor)."""
    server = make_server(app, host, port, limits, fast)
    with contextlib.suppress(KeyboardInterrupt):
        server.run(sockets=[sock] if sock is not None else None)
    if not server.started:  # as uvicorn.run: a failed start-up is a failed process
        raise SystemExit(3)


def serve_together(servers: list[uvicorn.Server]) -> None:
    """Run several servers (each from :func:`make_server`) in one process and event loop,
    until a signal or the end of any of them; then stop them last first, each once the one
    after it has ended (services.node: the worker, then the router, which sends requests to
    the worker's engines; stopped together, the worker stopped its engines under the
    router's streams, which its graceful shutdown was still waiting for)."""
    missing = [n for n in ("_serve", "capture_signals", "handle_exit")
               if not hasattr(uvicorn.Server, n)]
    if missing:
        raise SystemExit("this uvicorn release lacks what serving two servers in one process "
                         f"uses ({', '.join(missing)}); install from requirements.lock")
    last = servers[-1]
    handle_exit = last.handle_exit

    def on_signal(sig: int, frame: Any) -> None:
        # uvicorn installs one server's handler: it stops that server (the last), which
        # stops the others in turn; a second Ctrl-C (force) reaches every one at once.
        handle_exit(sig, frame)
        if last.force_exit:
            for s in servers:
                s.should_exit = s.force_exit = True

    last.handle_exit = on_signal  # type: ignore[method-assign]

    async def serve_one(server: uvicorn.Server) -> None:
        # uvicorn exits (SystemExit) when a start-up fails, a port taken say: caught here,
        # so that the others still shut down in order (a worker's engines stopped) first.
        with contextlib.suppress(SystemExit):
            await server._serve()

    async def main() -> None:
        with last.capture_signals():
            tasks = [asyncio.create_task(serve_one(s)) for s in servers]
            try:
                await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
            finally:
                for server, task in zip(reversed(servers), reversed(tasks), strict=True):
                    server.should_exit = True
                    await asyncio.wait([task])
            for r in await asyncio.gather(*tasks, return_exceptions=True):
                if isinstance(r, BaseException):
                    raise r

    with contextlib.suppress(KeyboardInterrupt), asyncio.Runner(
            loop_factory=last.config.get_loop_factory()) as runner:
        runner.run(main())
    if not all(s.started for s in servers):
        raise SystemExit(3)


def make_server(app: FastAPI, host: str, port: int, limits: Limits,
                fast: Picker | None = None) -> uvicorn.Server:
    """A uvicorn server for ``app`` behind the edge ``limits``, its fast lane on ``fast``."""
    unguarded = edge.missing_internals()
    if unguarded:
        # Fail closed: without them the header, timeout and connection limits cannot hold.
        raise SystemExit(
            "this uvicorn release lacks internals the edge limits use ("
            + ", ".join(unguarded) + "); install the pinned versions from requirements.lock")
    http: type[asyncio.Protocol] = edge.guarded(limits)
    if fast is not None:
        missing = fastlane.missing_internals()
        if not missing:
            http = fastlane.protocol_for(fast, limits)
        else:
            logging.getLogger(__name__).warning(
                "this uvicorn release lacks internals the fast lane uses (%s): the lane is off "
                "and every request goes through ASGI (slower, same answers); install from "
                "requirements.lock", ", ".join(missing))
    config = uvicorn.Config(
        app,
        host=host,
        port=port,
        loop="uvloop",
        http=http,
        ws="none",  # no WebSocket endpoints: an upgrade must not leave the guarded protocol
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
        timeout_keep_alive=max(1, round(limits.keep_alive_s)),
    )
    return uvicorn.Server(config)


class ClientGone(Exception):
    """The client disconnected before the response was ready."""


async def body_stream(request: Request) -> AsyncIterator[bytes]:
    """The request body as it arrives; ClientGone when the client disconnects mid-way."""
    try:
        async for chunk in request.stream():
            yield chunk
    except ClientDisconnect:
        raise ClientGone() from None


async def _wait_disconnect(request: Request) -> None:
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def cancel_on_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await ``work``, cancelling it if the client disconnects first (the request body must
    have been read already). Cancelling closes the upstream connection, which is how an
    abandoned generation is aborted hop by hop down to the engine."""
    task = asyncio.ensure_future(work)
    watcher = asyncio.ensure_future(_wait_disconnect(request))
    try:
        await asyncio.wait({task, watcher}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watcher.cancel()
    if task.done():
        return task.result()
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    raise ClientGone()
