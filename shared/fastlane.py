"""The fast lane: hot requests served on uvicorn's connection protocol, below ASGI.

A service names its hot requests (method and path) and gives a handler for them. The handler
runs as the request's task, reads the head and body uvicorn parsed, and writes its response
straight to the socket: a buffered answer in one write, a relayed one as each upstream read
arrives (:mod:`shared.wire`). Anything unusual (an error to explain, a request to hold while
a model starts, a body that is too large or chunked) the handler hands back by returning
False, and the request then runs through the ASGI app as any other, body included. So every
error path keeps its one implementation in the app, and the common case skips Starlette, its
middleware and the ASGI message exchange, most of a hop's CPU (docs/performance.md).

This subclasses uvicorn's httptools protocol, overrides one internal method
(``_start_asgi_task``) and uses some of uvicorn's internal attributes; :func:`missing_internals`
checks for every one of them and the services fall back to plain ASGI, with a warning naming
what is missing, where a uvicorn release lacks any.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
from collections.abc import Awaitable, Callable
from typing import Any, ClassVar, Protocol

from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from shared.edge import GuardedProtocol, Limits, absent, status_line_missing
from shared.errors import ApiError, UpstreamError, error_body, sse_error
from shared.usage_strip import UsageStrip
from shared.wire import Exchange

logger = logging.getLogger(__name__)

Handler = Callable[["Lane"], Awaitable[bool]]


class ChunkWatch(Protocol):
    """Told of every body chunk a relay sends on (the router's request record: TTFT,
    chunk gaps, usage)."""

    def chunk(self, data: bytes) -> None: ...


# (method, path) -> the handler for it, or None for the ASGI app.
Picker = Callable[[str, str], Handler | None]

_STATUS_LINE: dict[int, bytes] = getattr(httptools_impl, "STATUS_LINE", {})
# Only these upstream response headers pass on; hop-by-hop ones must not.
PASS_HEADERS = frozenset((b"content-type", b"retry-after", b"x-request-id"))
# Begins with an event's end: the upstream may have failed inside an event, whose bytes were
# passed on already, and the error must not be read as part of it (blank lines are no event).
STREAM_BROKEN = b"\n\n" + sse_error(UpstreamError(
    "the replica serving this stream failed mid-way; the output above is incomplete",
    code="stream_interrupted"))
_JSON = b"content-type: application/json\r\n"
_TAIL_MAX = 16 * 1024


def keep_tail(tail: bytearray, data: bytes) -> None:
    """Append ``data`` to ``tail``, keeping at least the last 8 KiB (a stream's final usage
    chunk is read from there), so a long stream costs no more than that."""
    tail += data
    if len(tail) > _TAIL_MAX:
        del tail[:-_TAIL_MAX // 2]


# Every uvicorn internal the lane relies on. uvicorn is pinned (requirements.lock), and this
# list is checked at start-up so that a release that renames any of them turns the lane off
# with a warning instead of failing requests (tests/unit/test_lock.py checks the pinned one).
_PROTOCOL_METHODS = ("_start_asgi_task", "connection_lost", "pause_writing", "resume_writing")
_PROTOCOL_ATTRS = ("tasks", "loop", "transport")
_CYCLE_METHODS = ("run_asgi",)
_CYCLE_ATTRS = ("scope", "keep_alive", "waiting_for_100_continue", "more_body", "disconnected",
                "flow", "message_event", "body", "response_started", "response_complete",
                "on_response")


def missing_internals(protocol: type = HttpToolsProtocol,
                      cycle: type = RequestResponseCycle) -> list[str]:
    """The uvicorn internals the lane uses that this uvicorn lacks (empty: the lane can run)."""
    return (absent(protocol, _PROTOCOL_METHODS, _PROTOCOL_ATTRS)
            + absent(cycle, _CYCLE_METHODS, _CYCLE_ATTRS) + status_line_missing())


def supported() -> bool:
    return not missing_internals()


# A client's own request id is kept when it is this plain; anything else (too long, spaces,
# control or non-ASCII bytes) is replaced, so it is safe in headers and logs downstream.
_VALID_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")


def new_request_id() -> str:
    # 32 hex digits: a valid UUID, which llama-cpp-python's server insists on.
    return os.urandom(16).hex()


def request_id_of(given: bytes | None) -> bytes:
    """The id of a request: the client's ``x-request-id`` when it is valid, else a new one."""
    if given is not None and _VALID_REQUEST_ID.fullmatch(given):
        return given
    return new_request_id().encode()


def pass_headers(headers: list[tuple[bytes, bytes]], request_id: bytes | None = None) -> bytes:
    """The upstream headers that pass on; with ``request_id``, that id replaces the
    upstream's own, so every answer carries the id the client knows."""
    if request_id is None:
        return b"".join([k + b": " + v + b"\r\n" for k, v in headers if k in PASS_HEADERS])
    out = [k + b": " + v + b"\r\n" for k, v in headers
           if k in PASS_HEADERS and k != b"x-request-id"]
    out.append(b"x-request-id: " + request_id + b"\r\n")
    return b"".join(out)


class Lane:
    """One request on the fast lane: its head and body, and a writer for its response."""

    __slots__ = (
        "_chunked",
        "_exchange",
        "_over",
        "_pending",
        "_sse",
        "cycle",
        "extra",
        "finished",
        "method",
        "path",
        "proto",
        "request_id",
        "started",
        "strip",
        "tail",
        "task",
        "watch",
    )

    def __init__(self, proto: FastProtocol, cycle: RequestResponseCycle) -> None:
        self.cycle = cycle
        self.proto = proto
        self.method: str = cycle.scope["method"]
        self.path: str = cycle.scope["path"]
        self.started = False
        self.finished = False
        self.task: asyncio.Task[None] | None = None
        self._exchange: Exchange | None = None
        self._chunked = False
        self._sse = False
        self._over: asyncio.Future[None] | None = None
        self._pending: bytes | None = None  # the response head, until it can leave with data
        # Set by the handler once known: every answer of this request then carries it.
        self.request_id: bytes | None = None
        # Response headers of our own (e.g. rate limits), added to a relayed answer's.
        self.extra = b""
        # When set, the last bytes of a relayed answer are kept here (a stream's final usage
        # chunk, read once it is over).
        self.tail: bytearray | None = None
        # When set, the usage event the router asked for is taken out of the relayed stream.
        self.strip: UsageStrip | None = None
        self.watch: ChunkWatch | None = None

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.cycle.scope["headers"]:
            if k == name:
                return v
        return None

    async def read_body(self, limit: int) -> bytes | None:
        """The body, or None when the ASGI app should take the request: no Content-Length
        (chunked upload), or more than ``limit`` bytes declared."""
        declared = self.header(b"content-length")
        if declared is None or not declared.isdigit() or int(declared) > limit:
            return None
        cycle = self.cycle
        if cycle.waiting_for_100_continue and cycle.more_body:
            # curl and others send `Expect: 100-continue` before a larger body, then wait.
            self.proto.transport.write(b"HTTP/1.1 100 Continue\r\n\r\n")
            cycle.waiting_for_100_continue = False
        while cycle.more_body and not cycle.disconnected:
            cycle.flow.resume_reading()
            await cycle.message_event.wait()
            cycle.message_event.clear()
        if cycle.disconnected:
            raise asyncio.CancelledError("client gone")
        # Left in place: the ASGI app reads it again if the request is handed back.
        return bytes(cycle.body)

    # -- responses ----------------------------------------------------------------------------

    def _head(self, status: int, headers: bytes, framing: bytes) -> bytes:
        close = b"" if self.cycle.keep_alive else b"connection: close\r\n"
        return _STATUS_LINE[status] + headers + framing + close + b"\r\n"

    def respond(self, status: int, headers: bytes, body: bytes) -> None:
        """A whole response in one write."""
        self.started = True
        head = self._head(status, headers, b"content-length: %d\r\n" % len(body))
        self.proto.transport.write(head + body)
        self._finish()

    def respond_error(self, err: ApiError) -> None:
        extra = b"".join(f"{k}: {v}\r\n".encode("latin-1") for k, v in err.headers.items())
        if self.request_id is not None:
            extra += b"x-request-id: " + self.request_id + b"\r\n"
        self.respond(err.status, _JSON + extra,
                     error_body(err.message, err.type, err.code, err.param))

    async def relay(self, ex: Exchange) -> None:
        """Pass ``ex``'s response on as it arrives: one write per upstream read, the body
        bytes untouched (a chunked answer is re-framed per read, never merged or split)."""
        length = ex.length
        self._chunked = length is None
        self._sse = (ex.header(b"content-type") or b"").startswith(b"text/event-stream")
        if not (self._chunked and self._sse):
            self.strip = None  # an error answer, or anything framed by its length: as sent
        framing = b"transfer-encoding: chunked\r\n" if length is None else \
            b"content-length: %d\r\n" % length
        self.started = True
        self._pending = self._head(
            ex.status, pass_headers(ex.headers, self.request_id) + self.extra, framing)
        self._over = asyncio.get_running_loop().create_future()
        self._exchange = ex
        try:
            ex.pipe(self)  # what already arrived leaves with the head, in one write
            if self._pending is not None:  # nothing yet: the head goes now, not later
                self.proto.transport.write(self._pending)
                self._pending = None
            await self._over
        finally:
            self._exchange = None
            ex.close()

    # -- Sink: called by the upstream connection as its reads arrive ---------------------------

    def _framed(self, data: bytes, last: bool = False) -> bytes:
        if self.tail is not None and data:
            keep_tail(self.tail, data)
        if self.strip is not None:
            data = self.strip.pass_on(data, last)
        if self._chunked and data:
            data = b"%x\r\n%b\r\n" % (len(data), data)
        if self._pending is not None:
            data, self._pending = self._pending + data, None
        return data

    def body(self, data: bytes) -> None:
        if self.watch is not None:
            self.watch.chunk(data)
        self.proto.transport.write(self._framed(data))

    def end(self, data: bytes, error: Exception | None) -> None:
        if self.watch is not None and data:
            self.watch.chunk(data)
        out = self._framed(data, last=True)
        cut = False
        if error is not None:
            logger.warning("upstream failed mid-response: %s", error)
            if self._chunked and self._sse:
                # Bytes already reached the client: never glue a retry onto a partial answer.
                # The event stream ends with an error event OpenAI clients raise.
                out += b"%x\r\n%b\r\n" % (len(STREAM_BROKEN), STREAM_BROKEN)
            else:
                # Anything else is cut short, so the client sees an incomplete message.
                self.cycle.keep_alive, cut = False, True
        # A complete chunked answer ends with its last chunk, also on a connection that closes
        # after it (the client asked so, or a graceful shutdown): without it the client sees
        # an incomplete answer.
        if self._chunked and not cut:
            out += b"0\r\n\r\n"
        if out:
            self.proto.transport.write(out)
        self._finish()
        if self._over is not None and not self._over.done():
            self._over.set_result(None)

    def _finish(self) -> None:
        if self.finished:
            return
        self.finished = True
        cycle = self.cycle
        cycle.response_started = True
        cycle.response_complete = True
        if not cycle.keep_alive:
            self.proto.end_connection()
        cycle.on_response()

    # -- called by the protocol ----------------------------------------------------------------

    def gone(self) -> None:
        """The client disconnected: stop the work (which closes the upstream connection)."""
        if not self.finished and self.task is not None:
            self.task.cancel()

    def pause(self) -> None:
        if self._exchange is not None:
            self._exchange.pause()

    def resume(self) -> None:
        if self._exchange is not None:
            self._exchange.resume()


class FastProtocol(GuardedProtocol):
    """uvicorn's httptools protocol with the edge limits (:mod:`shared.edge`), and hot
    requests taken before they become ASGI."""

    # In a tuple so that it is not bound as a method.
    picker: ClassVar[tuple[Picker]]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.lane: Lane | None = None

    def _start_asgi_task(self, cycle: RequestResponseCycle, app: Any) -> None:
        handler = self.picker[0](cycle.scope["method"], cycle.scope["path"])
        if handler is None:
            super()._start_asgi_task(cycle, app)
            return
        lane = Lane(self, cycle)
        task = self.loop.create_task(self._run(lane, handler, app))
        lane.task = task
        task.add_done_callback(self.tasks.discard)
        self.tasks.add(task)

    async def _run(self, lane: Lane, handler: Handler, app: Any) -> None:
        self.lane = lane
        handled = True
        try:
            handled = await handler(lane)
        except asyncio.CancelledError:
            # The client went away (see connection_lost); the handler's cleanup has run.
            lane.cycle.keep_alive = False
            lane._finish()
        except ApiError as e:
            self._fail(lane, e)
        except Exception as e:
            logger.exception("unhandled error on the fast lane", exc_info=e)
            self._fail(lane, ApiError("internal error"))
        finally:
            if self.lane is lane:
                self.lane = None
        if not handled:
            lane.cycle.message_event.set()  # the body is all there: don't wait for more
            await lane.cycle.run_asgi(app)

    @staticmethod
    def _fail(lane: Lane, err: ApiError) -> None:
        if lane.finished:
            return
        if not lane.started:
            lane.respond_error(err)
        else:
            lane.cycle.keep_alive = False
            lane._finish()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.lane is not None:
            self.lane.gone()
        super().connection_lost(exc)

    def pause_writing(self) -> None:
        super().pause_writing()
        if self.lane is not None:
            self.lane.pause()

    def resume_writing(self) -> None:
        super().resume_writing()
        if self.lane is not None:
            self.lane.resume()


def protocol_for(picker: Picker, limits: Limits) -> type[FastProtocol]:
    """The protocol class to give uvicorn for a service with these hot requests."""
    return type("FastLaneProtocol", (FastProtocol,), {"picker": (picker,), "limits": limits})
