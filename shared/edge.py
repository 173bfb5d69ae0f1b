"""Edge limits on every service's HTTP connections, below ASGI (fast lane and ASGI path alike).

uvicorn's httptools protocol has none of these: httptools gathers a header line whole before
calling back (so one 256 MB header was 256 MB of memory), nothing times out a client that
sends its head or body slowly, and ``limit_concurrency`` answers only after a full request
head (an idle connection still holds its file descriptor), counts running tasks as well, and
logs every refusal. :class:`GuardedProtocol` adds, at the cost of a few integer operations
per parser callback and one timer per connection (re-armed only when it fires):

- total header bytes and header count (431), request-target length (414);
- a head read timeout and a body read timeout (408), then the connection is closed;
- a cap on open connections per process: the one over it gets a 503 and is closed, and a
  log line says so at most every ``_BUSY_LOG_S`` seconds.

Each refusal is an OpenAI-shaped error with ``connection: close``. A response sent before
the request body was read (a 413 for a declared length) ends the connection too, instead of
reading the rest of the body to reach the next request.
"""

from __future__ import annotations

import asyncio
import logging
import resource
import time
from dataclasses import dataclass
from typing import Any, ClassVar

import httptools
from uvicorn.protocols.http import httptools_impl
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from shared.errors import error_body
from shared.settings import CommonSettings

logger = logging.getLogger(__name__)

_STATUS_LINE: dict[int, bytes] = getattr(httptools_impl, "STATUS_LINE", {})
_BUSY_LOG_S = 10.0
# Bytes of a head beyond its headers and target: request line, separators, a read's slack.
_HEAD_SLACK = 4096
_OTHER, _HEAD, _BODY, _LINGER = 0, 1, 2, 3
# After an error is sent, reads are dropped this long before the close: closing a socket with
# unread input sends a reset, which can destroy the answer before the client reads it.
_LINGER_S = 1.0


@dataclass(frozen=True, slots=True)
class Limits:
    header_bytes: int
    header_count: int
    url_bytes: int
    header_timeout_s: float
    body_timeout_s: float
    keep_alive_s: float
    connections: int

    @classmethod
    def of(cls, s: CommonSettings, open_files: int) -> Limits:
        """The limits of settings ``s``; the connection cap is kept to half of the process's
        open-file limit, leaving the rest for upstream connections, Redis, logs, engines."""
        return cls(s.max_header_bytes, s.max_header_count, s.max_url_bytes, s.header_timeout_s,
                   s.body_timeout_s, s.keep_alive_s, min(s.max_connections, open_files // 2))


def raise_open_files() -> int:
    """Raise the soft open-file limit to the hard limit; return the soft limit now."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or soft < hard:
        target = hard if hard != resource.RLIM_INFINITY else max(soft, 1 << 20)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (target, hard))
            soft = target
        except (ValueError, OSError) as e:
            logger.warning("could not raise the open-file limit from %d to %d: %s",
                           soft, target, e)
    return int(soft)


class _Reject(Exception):
    def __init__(self, status: int, message: str, code: str) -> None:
        super().__init__(message)
        self.status, self.message, self.code = status, message, code


def error_head(status: int, message: str, code: str, extra: bytes = b"") -> bytes:
    """A complete error response that closes the connection."""
    body = error_body(message, "invalid_request_error" if status < 500 else
                      "service_unavailable", code)
    return (_STATUS_LINE[status] + b"content-type: application/json\r\n" + extra +
            b"content-length: %d\r\nconnection: close\r\n\r\n" % len(body) + body)


class _Throttle:
    """Counts events; says when to log (at most once per ``every_s``) and how many since."""

    def __init__(self, every_s: float) -> None:
        self.every_s = every_s
        self.last = -every_s
        self.count = 0

    def tick(self) -> int:
        self.count += 1
        now = time.monotonic()
        if now - self.last < self.every_s:
            return 0
        self.last, n, self.count = now, self.count, 0
        return n


_busy_log = _Throttle(_BUSY_LOG_S)
_junk_log = _Throttle(_BUSY_LOG_S)


class GuardedProtocol(HttpToolsProtocol):
    """uvicorn's httptools protocol with the limits above."""

    limits: ClassVar[Limits]

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._phase = _OTHER
        self._deadline = 0.0
        self._timer: asyncio.TimerHandle | None = None
        self._head_bytes = 0  # read while a head is incomplete: bounds httptools' buffering
        self._header_bytes = 0
        self._header_count = 0

    # -- connection ---------------------------------------------------------------------------

    def connection_made(self, transport: asyncio.Transport) -> None:  # type: ignore[override]
        super().connection_made(transport)
        if len(self.connections) > self.limits.connections:
            n = _busy_log.tick()
            if n:
                logger.warning("refused %d connection(s) with 503: %d open, the cap is %d "
                               "(MAX_CONNECTIONS, open-file limit)", n, len(self.connections) - 1,
                               self.limits.connections)
            self._close_with(error_head(503, "too many open connections; retry", "busy",
                                        b"retry-after: 1\r\n"))
            return
        self._expect(_HEAD, self.limits.header_timeout_s)

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        self._phase = _OTHER
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        if self._phase == _LINGER:
            return
        self._unset_keepalive_if_required()
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserCallbackError as e:
            if isinstance(e.__context__, _Reject):
                self._reject(e.__context__)
            else:
                self._bad_request()
            return
        except httptools.HttpParserError:
            self._bad_request()
            return
        except httptools.HttpParserUpgrade:
            # An upgrade request (h2c, WebSocket) is served as the HTTP/1.1 request it also
            # is, as uvicorn does; its WebSocket support is off (shared/http.serve).
            pass
        if self._phase == _HEAD:
            self._head_bytes += len(data)
            if self._head_bytes > self.limits.header_bytes + self.limits.url_bytes + _HEAD_SLACK:
                self._reject(_Reject(431, "request headers are too large", "headers_too_large"))

    def end_connection(self) -> None:
        """Close, unless an error answer is lingering (its timer closes it then)."""
        if self._phase != _LINGER:
            self.transport.close()

    def _bad_request(self) -> None:
        # uvicorn's own answer is plain text and logged each time; a client that sends junk
        # gets the one error shape, and the log a line per burst.
        n = _junk_log.tick()
        if n:
            logger.warning("answered %d malformed HTTP request(s) with 400", n)
        self._close_with(error_head(400, "malformed HTTP request", "invalid_http"))

    def _reject(self, r: _Reject) -> None:
        if self.cycle is None or self.cycle.response_complete:
            self._close_with(error_head(r.status, r.message, r.code))
        else:  # a response is on its way: it cannot be interleaved with another
            self.transport.close()

    def _close_with(self, response: bytes) -> None:
        """Send ``response``, end the output, drop input for a moment, then close."""
        self.transport.write(response)
        self._linger()

    def _linger(self) -> None:
        try:
            self.transport.write_eof()
        except (NotImplementedError, OSError, RuntimeError):
            self.transport.close()
            return
        self._expect(_LINGER, _LINGER_S)

    def on_response_complete(self) -> None:
        if self._phase == _LINGER:
            return
        if self._phase == _BODY and not self.transport.is_closing():
            # Answered before the body arrived (a 413 for its declared length): the rest of
            # the body is not read to reach a next request; the connection ends here.
            self.server_state.total_requests += 1
            self._linger()
            return
        super().on_response_complete()

    # -- parser callbacks ---------------------------------------------------------------------

    def on_message_begin(self) -> None:
        super().on_message_begin()
        self._head_bytes = self._header_bytes = self._header_count = 0
        self._expect(_HEAD, self.limits.header_timeout_s)

    def on_url(self, url: bytes) -> None:
        super().on_url(url)
        if len(self.url) > self.limits.url_bytes:
            raise _Reject(414, f"request target is longer than {self.limits.url_bytes} bytes",
                          "uri_too_long")

    def on_header(self, name: bytes, value: bytes) -> None:
        self._header_count += 1
        self._header_bytes += len(name) + len(value)
        if self._header_count > self.limits.header_count:
            raise _Reject(431, f"more than {self.limits.header_count} request headers",
                          "too_many_headers")
        if self._header_bytes > self.limits.header_bytes:
            raise _Reject(431, f"request headers are larger than {self.limits.header_bytes} "
                          "bytes", "headers_too_large")
        super().on_header(name, value)

    def on_headers_complete(self) -> None:
        self._expect(_BODY, self.limits.body_timeout_s)
        super().on_headers_complete()
        if self.pipeline:
            # Queued behind a request in flight, with reading paused: not the client's delay.
            self._phase = _OTHER

    def on_message_complete(self) -> None:
        self._phase = _OTHER
        super().on_message_complete()

    # -- the one timer ------------------------------------------------------------------------

    def _expect(self, phase: int, timeout_s: float) -> None:
        self._phase = phase
        self._deadline = self.loop.time() + timeout_s
        timer = self._timer
        if timer is None or timer.when() > self._deadline:
            if timer is not None:
                timer.cancel()
            self._timer = self.loop.call_at(self._deadline, self._on_timer)

    def _on_timer(self) -> None:
        self._timer = None
        if self._phase == _OTHER:
            return
        if self.loop.time() < self._deadline:
            self._timer = self.loop.call_at(self._deadline, self._on_timer)
            return
        if self._phase == _LINGER:
            self.transport.close()
            return
        if self.transport.is_closing():
            return
        cycle = self.cycle
        if self._phase == _HEAD:
            if cycle is not None and not cycle.response_complete:
                # A next head sent while this connection still answers: the wait is ours.
                self._expect(_HEAD, self.limits.header_timeout_s)
                return
            if self._head_bytes == 0:
                # Opened and never used (a pre-connected client): closed like an idle
                # keep-alive connection, with no answer it could take for another request's.
                self.transport.close()
                return
            self._timed_out("headers", self.limits.header_timeout_s)
            return
        if cycle is not None:
            # The request waiting for this body sees the client gone and sends nothing.
            cycle.disconnected = True
            cycle.message_event.set()
            if cycle.response_started:
                self.transport.close()
                return
        self._timed_out("body", self.limits.body_timeout_s)

    def _timed_out(self, what: str, limit: float) -> None:
        self._close_with(error_head(
            408, f"request {what} not received within {limit:g} s", "request_timeout"))


def attribute_names(cls: type) -> set[str]:
    """Attribute names ``cls``'s methods (its bases' included) read or assign: instance
    attributes are set in ``__init__`` or ``connection_made``, so they are not visible on the
    class itself."""
    out: set[str] = set()
    for klass in cls.__mro__:
        for value in vars(klass).values():
            code = getattr(value, "__code__", None)
            if code is not None:
                out.update(code.co_names)
    return out


# The uvicorn internals GuardedProtocol overrides or reads. uvicorn is pinned
# (requirements.lock); a release without one of them would weaken the limits or fail every
# request, so the services refuse to start instead (shared.http.serve).
_EDGE_METHODS = ("data_received", "connection_made", "connection_lost", "on_url", "on_header",
                 "on_headers_complete", "on_message_begin", "on_message_complete",
                 "on_response_complete", "_unset_keepalive_if_required")
_EDGE_ATTRS = ("parser", "pipeline", "server_state", "connections", "cycle", "url", "loop",
               "transport")


_EDGE_CYCLE_ATTRS = ("response_complete", "response_started", "disconnected", "message_event")


def absent(cls: type, methods: tuple[str, ...], attrs: tuple[str, ...]) -> list[str]:
    """Those of ``methods`` and ``attrs`` that ``cls`` lacks, as ``Class.name``; also
    ``httptools_impl.STATUS_LINE`` when that table is gone."""
    seen = attribute_names(cls)
    missing = [f"{cls.__name__}.{m}" for m in methods if not callable(getattr(cls, m, None))]
    missing += [f"{cls.__name__}.{a}" for a in attrs if a not in seen]
    return missing


def status_line_missing() -> list[str]:
    ok = isinstance(getattr(httptools_impl, "STATUS_LINE", None), dict)
    return [] if ok else ["httptools_impl.STATUS_LINE"]


def missing_internals(protocol: type = HttpToolsProtocol,
                      cycle: type = RequestResponseCycle) -> list[str]:
    """The uvicorn internals the edge limits use that this uvicorn lacks (empty: fine)."""
    return (absent(protocol, _EDGE_METHODS, _EDGE_ATTRS)
            + absent(cycle, (), _EDGE_CYCLE_ATTRS) + status_line_missing())


def guarded(limits: Limits) -> type[GuardedProtocol]:
    """The protocol class to give uvicorn for a service with these limits."""
    return type("GuardedProtocol", (GuardedProtocol,), {"limits": limits})
