"""The hot path's HTTP/1.1 client: pooled keep-alive connections on plain asyncio protocols,
responses parsed with httptools.

Not aiohttp or httpx, by measurement (docs/performance.md): both wrap every request in
several objects, tasks and timers, which on the router -> worker -> engine path cost more CPU
than everything else together. Here a request is one write on a pooled connection and one
future resolved by the parser; a streamed answer goes to a :class:`Sink` from the connection's
``data_received``, one call per socket read, so an event is never re-buffered or delayed by a
task switch.

An upstream is ``http://host:port`` or, for an engine on a Unix socket (the worker's default:
vLLM's ``--uds``), ``http+unix://`` and the socket's path, percent-encoded
(:func:`unix_url`).

Timeouts: connecting is bounded by ``connect_timeout_s`` (past it, an :class:`UpstreamError`:
nothing was sent, so another upstream may take the request); a response that sends nothing for
``read_timeout_s`` (before its headers or between body reads) fails with
:class:`UpstreamTimeout`, checked by one sweeper task per pool instead of a timer per read.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import time
from collections.abc import AsyncIterator
from typing import Protocol, cast
from urllib.parse import quote, unquote, urlsplit

import httptools

from shared.errors import UpstreamError, UpstreamTimeout
from shared.upload import Upload

# Pool.heard is pruned of upstreams not heard from for _HEARD_FOR_S once it holds more than
# _HEARD_KEEP of them.
_HEARD_KEEP = 256
_HEARD_FOR_S = 600.0

# A consumer that lags this far behind pauses reading from the upstream socket. Small, so a
# slow reader of a large answer costs the process little (and leaves little behind).
_HIGH_WATER = 1 << 18


class Sink(Protocol):
    """Where a piped answer goes, synchronously, as it arrives: ``body`` once per socket
    read, and ``end`` once with the last read's bytes (so the end costs no extra write)."""

    def body(self, data: bytes) -> None: ...

    def end(self, data: bytes, error: Exception | None) -> None: ...


def unix_url(path: str) -> str:
    """The base URL of an HTTP server on the Unix socket at ``path``."""
    return "http+unix://" + quote(path, safe="")


@functools.lru_cache(maxsize=4096)
def _target(base_url: str) -> tuple[str, int, bytes]:
    """(host, port, Host header) of ``base_url``; for a Unix socket (its path, 0, localhost)."""
    parts = urlsplit(base_url)
    if parts.scheme == "http+unix" and parts.netloc:
        return unquote(parts.netloc), 0, b"localhost"
    if parts.scheme != "http" or not parts.hostname:
        raise ValueError(f"only http:// and http+unix:// upstreams are supported, not "
                         f"{base_url!r}")
    port = parts.port or 80
    return parts.hostname, port, f"{parts.hostname}:{port}".encode()


class Exchange:
    """One request and its response on one connection. The response headers are there when
    :meth:`Pool.send` returns; the body is read whole, iterated, or piped to a sink."""

    __slots__ = (
        "_cap",
        "_conn",
        "_error",
        "_head",
        "_parts",
        "_sink",
        "_size",
        "_wake",
        "activity",
        "complete",
        "got_bytes",
        "headers",
        "status",
    )

    def __init__(self, conn: _Conn, head: asyncio.Future[None]) -> None:
        self._conn: _Conn | None = conn
        self.status = 0
        self.headers: list[tuple[bytes, bytes]] = []
        self._parts: list[bytes] = []
        self._size = 0
        # Reading from the upstream pauses once more than this many bytes wait here
        # unclaimed: _HIGH_WATER until a consumer says otherwise (read_at_most: its limit;
        # read_all and a piped sink: no cap, the sink's transport pausing it instead).
        # Without it, the body read in the same readable event as the headers was held
        # whole: libuv reads until the socket is empty (up to 32 reads of 256 KB), so a
        # fast upstream's 5 MB answer sat in the router before anyone asked for it.
        self._cap: int | None = _HIGH_WATER
        self.complete = False
        self._error: Exception | None = None
        self._sink: Sink | None = None
        self._wake: asyncio.Future[None] | None = None
        self._head = head
        self.activity = time.monotonic()
        self.got_bytes = False

    def header(self, name: bytes) -> bytes | None:
        for k, v in self.headers:
            if k == name:
                return v
        return None

    @property
    def length(self) -> int | None:
        """The declared Content-Length; None for a chunked or close-delimited body."""
        value = self.header(b"content-length")
        return int(value) if value is not None and value.isdigit() else None

    async def read_all(self) -> bytes:
        """The whole body; the connection then goes back to the pool."""
        self._claim(None)
        while not self.complete:
            if self._error is not None:
                raise self._error
            await self._waiter()
        data = b"".join(self._parts)
        self._parts.clear()
        return data

    async def read_at_most(self, limit: int) -> bytes | None:
        """The whole body if it is at most ``limit`` bytes (the connection then goes back to
        the pool), else None as soon as it is known to be larger: what arrived stays queued
        for :meth:`chunks` or :meth:`pipe`, so the caller can relay the rest instead of
        holding an answer of any size in memory."""
        declared = self.length
        if declared is not None and declared > limit:
            return None
        self._claim(max(limit, _HIGH_WATER))
        while not self.complete:
            if self._error is not None:
                raise self._error
            if self._size > limit:
                return None
            await self._waiter()
        return await self.read_all()

    async def chunks(self) -> AsyncIterator[bytes]:
        """The body as it arrives, one piece per socket read, never joined: a large answer
        then never needs one large allocation (which the allocator would keep after); an
        upstream failure raises :class:`UpstreamError`."""
        self._claim(_HIGH_WATER)
        parts = self._parts
        while True:
            if parts:
                data = parts.pop(0)
                self._size -= len(data)
                if self._size <= _HIGH_WATER and self._conn is not None:
                    self._conn.resume()
                yield data
                continue
            if self.complete:
                return
            if self._error is not None:
                raise self._error
            await self._waiter()

    def pipe(self, sink: Sink) -> None:
        """Hand the body to ``sink`` from now on; what already arrived goes first, and the
        sink's transport pauses the reading from then on (its first write may)."""
        self._sink = sink
        self._claim(None)
        self._flush()

    def pause(self) -> None:
        if self._conn is not None:
            self._conn.pause()

    def resume(self) -> None:
        if self._conn is not None:
            self._conn.resume()

    def close(self) -> None:
        """Abandon the exchange. Unless the response was complete this closes the connection,
        which is what tells the upstream to stop generating."""
        conn, self._conn = self._conn, None
        if conn is not None and not self.complete:
            conn.abort()
        self._sink = None

    def _claim(self, cap: int | None) -> None:
        """A consumer claims the body: from now on read ahead up to ``cap`` bytes it has not
        taken (None: no cap), resuming a read the default cap had paused."""
        self._cap = cap
        if self._conn is not None and (cap is None or self._size <= cap):
            self._conn.resume()

    # -- fed by the connection --------------------------------------------------------------

    def _waiter(self) -> asyncio.Future[None]:
        self._wake = asyncio.get_running_loop().create_future()
        return self._wake

    def _flush(self) -> None:
        sink = self._sink
        if sink is not None:
            parts = self._parts
            data = (parts[0] if len(parts) == 1 else b"".join(parts)) if parts else b""
            parts.clear()
            if self.complete or self._error is not None:
                self._sink = None
                sink.end(data, self._error)
            elif data:
                sink.body(data)
            return
        wake = self._wake
        if wake is not None and (self._parts or self.complete or self._error is not None):
            self._wake = None
            if not wake.done():
                wake.set_result(None)
        if self._cap is not None and self._size > self._cap and self._conn is not None:
            self._conn.pause()

    def _fail(self, error: Exception) -> None:
        if self.complete or self._error is not None:
            return
        self._error = error
        if not self._head.done():
            self._head.set_exception(error)
            self._head.exception()  # retrieved: nobody may be waiting any more
        self._flush()


class _Conn(asyncio.Protocol):
    """One keep-alive connection to an upstream; serves one exchange at a time."""

    def __init__(self, pool: Pool, key: tuple[str, int]) -> None:
        self.pool = pool
        self.key = key
        self.transport: asyncio.Transport | None = None
        self.parser = httptools.HttpResponseParser(self)
        self.exchange: Exchange | None = None
        self.closed = False
        self.keep_alive = False
        # False while a streamed request body is being sent: a response that comes before
        # the body's end leaves the connection out of step, so it is closed, not reused.
        self.reusable = True
        self._paused = False
        self._drained: asyncio.Future[None] | None = None  # set while writing is paused

    # asyncio.Protocol

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses, hence no isinstance check.
        self.transport = cast(asyncio.Transport, transport)

    def data_received(self, data: bytes) -> None:
        ex = self.exchange
        if ex is None:  # bytes nobody asked for: the connection is out of step
            self.abort()
            return
        ex.activity = now = time.monotonic()
        self.pool.heard[self.key] = now
        ex.got_bytes = True
        try:
            self.parser.feed_data(data)
        except httptools.HttpParserError as e:
            ex._fail(UpstreamError(f"upstream sent an invalid response: {e}"))
            self.abort()
            return
        if ex.complete:
            self.exchange = None
            self.pool._done(ex)
            ex._conn = None
            if self.keep_alive and self.reusable and not self.closed:
                self.pool._release(self)
            else:
                self.abort()
        ex._flush()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.resume_writing()
        self.pool._forget(self)
        ex, self.exchange = self.exchange, None
        if ex is None:
            return
        self.pool._done(ex)
        if ex.status and ex.length is None and ex.header(b"transfer-encoding") is None:
            ex.complete = True  # a close-delimited body ends with the connection
            ex._flush()
        else:
            ex._fail(UpstreamError("upstream closed the connection before the response ended",
                                   code="upstream_unreachable"))

    # httptools callbacks

    def on_header(self, name: bytes, value: bytes) -> None:
        assert self.exchange is not None
        self.exchange.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        ex = self.exchange
        assert ex is not None
        ex.status = self.parser.get_status_code()
        if not ex._head.done():
            ex._head.set_result(None)

    def on_body(self, body: bytes) -> None:
        ex = self.exchange
        assert ex is not None
        ex._parts.append(body)
        ex._size += len(body)

    def on_message_complete(self) -> None:
        assert self.exchange is not None
        self.exchange.complete = True
        # Asked here: once feed_data returns, the parser has reset and always says no.
        self.keep_alive = self.parser.should_keep_alive()

    # flow control

    def pause_writing(self) -> None:
        if self._drained is None:
            self._drained = asyncio.get_running_loop().create_future()

    def resume_writing(self) -> None:
        drained, self._drained = self._drained, None
        if drained is not None and not drained.done():
            drained.set_result(None)

    async def writable(self) -> None:
        """Return once the transport's write buffer is below its high-water mark."""
        if self._drained is not None:
            await asyncio.shield(self._drained)

    def pause(self) -> None:
        if not self._paused and self.transport is not None and not self.closed:
            self._paused = True
            self.transport.pause_reading()

    def resume(self) -> None:
        if self._paused and self.transport is not None and not self.closed:
            self._paused = False
            self.transport.resume_reading()

    def write(self, data: bytes) -> None:
        if not self.closed and self.transport is not None and data:
            self.transport.write(data)

    def abort(self) -> None:
        if not self.closed and self.transport is not None:
            self.closed = True
            self.pool._forget(self)
            self.transport.abort()


def _framed(data: bytes, chunked: bool) -> bytes:
    if not chunked or not data:
        return data
    return b"%x\r\n%b\r\n" % (len(data), data)


class Pool:
    """Keep-alive connections per upstream address, reused last-in first-out."""

    def __init__(self, connect_timeout_s: float, read_timeout_s: float) -> None:
        self.connect_timeout_s = connect_timeout_s
        self.read_timeout_s = read_timeout_s
        self._idle: dict[tuple[str, int], list[_Conn]] = {}
        self._active: set[Exchange] = set()
        self._sweeper: asyncio.Task[None] | None = None
        # (host, port) -> when its last response bytes arrived (time.monotonic()).
        self.heard: dict[tuple[str, int], float] = {}

    def heard_from(self, base_url: str) -> float:
        """When response bytes from ``base_url`` last arrived (``time.monotonic()``; 0.0:
        never): an upstream that is answering requests is alive, whatever else is slow."""
        try:
            host, port, _ = _target(base_url)
        except ValueError:
            return 0.0
        return self.heard.get((host, port), 0.0)

    async def send(
        self, base_url: str, method: bytes, path: bytes, headers: bytes, body: bytes
    ) -> Exchange:
        """Send a request; return once the response headers arrived.

        ``headers`` are complete ``name: value\\r\\n`` lines (Host and Content-Length are
        added). Failing before any response byte raises :class:`UpstreamError` (nothing was
        answered, so the caller may try elsewhere); silence raises :class:`UpstreamTimeout`.
        A reused connection that turns out closed is retried once on a fresh one.
        """
        try:
            host, port, hostport = _target(base_url)
        except ValueError as e:
            raise UpstreamError(str(e), code="upstream_unsupported") from e
        request = b"%s %s HTTP/1.1\r\nhost: %s\r\ncontent-length: %d\r\n%s\r\n%s" % (
            method, path, hostport, len(body), headers, body)
        idle = self._idle.get((host, port))
        if idle:
            ex = self._start(idle.pop(), request)
            try:
                await ex._head
                return ex
            except UpstreamError:
                if ex.got_bytes:
                    raise
            except BaseException:
                ex.close()
                raise
        ex = self._start(await self._connect(host, port), request)
        try:
            await ex._head
        except BaseException:
            ex.close()
            raise
        return ex

    async def send_stream(
        self, base_url: str, method: bytes, path: bytes, headers: bytes, upload: Upload,
    ) -> Exchange:
        """Send a request whose body is ``upload``: its head, then each piece as the client
        sends it, at the pace the upstream reads (the socket's write buffer is the only
        buffer). Return once the response headers arrived, which may be before the body was
        all sent (an upstream that refuses early): the rest is then not read from the client,
        and the connection is closed after the response instead of reused.

        Always a fresh connection (a pooled one found closed could not be retried once the
        body began); framed by the declared length, else chunked. The upstream's silence is
        timed from the last piece sent, so a slow upload is not a silent upstream.
        """
        try:
            host, port, hostport = _target(base_url)
        except ValueError as e:
            raise UpstreamError(str(e), code="upstream_unsupported") from e
        length = upload.length
        chunked = length is None
        framing = b"transfer-encoding: chunked\r\n" if length is None else \
            b"content-length: %d\r\n" % length
        head = b"%s %s HTTP/1.1\r\nhost: %s\r\n%s%s\r\n" % (
            method, path, hostport, framing, headers)
        conn = await self._connect(host, port)
        conn.reusable = False
        ex = self._start(conn, head + _framed(bytes(upload.head), chunked))
        try:
            for kept in list(upload.kept):  # a retry: what the failed try was sent
                await conn.writable()
                conn.write(_framed(kept, chunked))
            while not ex._head.done():
                piece = await upload.next_piece(ex._head)
                if piece is None:
                    if upload.ended and not ex._head.done():
                        if chunked:
                            conn.write(b"0\r\n\r\n")
                        conn.reusable = True
                    break
                await conn.writable()
                conn.write(_framed(piece, chunked))
                ex.activity = time.monotonic()
            await ex._head
        except BaseException:
            ex.close()
            raise
        return ex

    def _start(self, conn: _Conn, request: bytes) -> Exchange:
        loop = asyncio.get_running_loop()
        ex = Exchange(conn, loop.create_future())
        conn.exchange = ex
        self._active.add(ex)
        if self._sweeper is None:
            self._sweeper = loop.create_task(self._sweep())
        assert conn.transport is not None
        conn.transport.write(request)
        return ex

    async def _connect(self, host: str, port: int) -> _Conn:
        loop = asyncio.get_running_loop()
        where = f"{host}:{port}" if port else f"unix:{host}"
        try:
            async with asyncio.timeout(self.connect_timeout_s):
                if port:
                    _, conn = await loop.create_connection(
                        lambda: _Conn(self, (host, port)), host, port)
                else:  # a Unix socket (port 0: see _target)
                    _, conn = await loop.create_unix_connection(
                        lambda: _Conn(self, (host, port)), host)
        except TimeoutError as e:
            # Nothing was sent: another upstream may take the request (UpstreamError).
            raise UpstreamError(f"connecting to {where} timed out",
                                code="upstream_unreachable") from e
        except OSError as e:
            raise UpstreamError(f"upstream {where} unreachable: {e.strerror or e}",
                                code="upstream_unreachable") from e
        return conn

    def _release(self, conn: _Conn) -> None:
        conn.resume()
        self._idle.setdefault(conn.key, []).append(conn)

    def _forget(self, conn: _Conn) -> None:
        idle = self._idle.get(conn.key)
        if idle and conn in idle:
            idle.remove(conn)
        if idle is not None and not idle:
            # Engines on Unix sockets get a new path at every start: keys are not reused.
            del self._idle[conn.key]

    def _done(self, ex: Exchange) -> None:
        self._active.discard(ex)

    async def _sweep(self) -> None:
        every = max(0.05, min(1.0, self.read_timeout_s / 4))
        while True:
            await asyncio.sleep(every)
            now = time.monotonic()
            limit = now - self.read_timeout_s
            if len(self.heard) > _HEARD_KEEP:
                # Long unheard upstreams (engines stopped since: their keys are not reused)
                # are forgotten; a health check only asks about the last seconds.
                self.heard = {k: t for k, t in self.heard.items() if t > now - _HEARD_FOR_S}
            for ex in [e for e in self._active if e.activity < limit]:
                self._active.discard(ex)
                conn = ex._conn
                ex._fail(UpstreamTimeout(
                    f"upstream sent nothing for {self.read_timeout_s:g} s"))
                if conn is not None:
                    conn.abort()

    async def close(self) -> None:
        if self._sweeper is not None:
            self._sweeper.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._sweeper
            self._sweeper = None
        for conns in list(self._idle.values()):
            for conn in list(conns):
                conn.abort()
        self._idle.clear()
