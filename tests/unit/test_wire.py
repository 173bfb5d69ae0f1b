"""The hot path's HTTP client (shared/wire.py) against real sockets: small asyncio servers
that script each upstream behaviour byte by byte."""

from __future__ import annotations

import asyncio
import contextlib
import os
import shutil
import socket
import tempfile
from collections.abc import AsyncIterator, Awaitable, Callable
from pathlib import Path

import pytest

from shared.errors import UpstreamError, UpstreamTimeout
from shared.wire import _HIGH_WATER, Pool, unix_url

Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter], Awaitable[None]]


class Upstream:
    def __init__(self, script: Script) -> None:
        self.script = script
        self.connections = 0
        self.server: asyncio.Server | None = None
        self.url = ""

    async def _handle(self, r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        self.connections += 1
        try:
            await self.script(r, w)
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            w.close()



@contextlib.asynccontextmanager
async def upstream(script: Script) -> AsyncIterator[Upstream]:
    up = Upstream(script)
    up.server = await asyncio.start_server(up._handle, "127.0.0.1", 0)
    up.url = f"http://127.0.0.1:{up.server.sockets[0].getsockname()[1]}"
    try:
        yield up
    finally:
        up.server.close()
        await up.server.wait_closed()


async def read_request(r: asyncio.StreamReader) -> tuple[bytes, bytes]:
    head = await r.readuntil(b"\r\n\r\n")
    length = 0
    for line in head.split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            length = int(line.split(b":")[1])
    return head, await r.readexactly(length)


def sized(body: bytes, extra: bytes = b"") -> bytes:
    head = b"HTTP/1.1 200 OK\r\ncontent-type: application/json\r\ncontent-length: %d\r\n"
    return head % len(body) + extra + b"\r\n" + body


async def echo_forever(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    while True:
        _, body = await read_request(r)
        w.write(sized(body))
        await w.drain()


class Collect:
    def __init__(self) -> None:
        self.reads: list[bytes] = []
        self.error: Exception | None = None
        self.ended = asyncio.Event()
        self.grew = asyncio.Event()

    def body(self, data: bytes) -> None:
        self.reads.append(data)
        self.grew.set()

    async def reads_at_least(self, n: int) -> None:
        async with asyncio.timeout(5):
            while len(self.reads) < n:
                self.grew.clear()
                await self.grew.wait()

    def end(self, data: bytes, error: Exception | None) -> None:
        if data:
            self.reads.append(data)
        self.error = error
        self.ended.set()
        self.grew.set()


async def send(pool: Pool, url: str, body: bytes = b"{}") -> bytes:
    ex = await pool.send(url, b"POST", b"/x", b"content-type: application/json\r\n", body)
    return await ex.read_all()


async def test_keep_alive_connection_is_reused() -> None:
    async with upstream(echo_forever) as up:
        pool = Pool(2, 5)
        for i in range(20):
            assert await send(pool, up.url, b'{"i": %d}' % i) == b'{"i": %d}' % i
        await pool.close()
    assert up.connections == 1


async def test_large_answer_is_read_whole() -> None:
    big = b"x" * (3 << 20)  # several MB: a large embeddings answer

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(sized(big))
        await w.drain()
        await r.read()  # keep the connection until the client is done

    async with upstream(script) as up:
        pool = Pool(2, 2)
        assert await asyncio.wait_for(send(pool, up.url), 10) == big
        await pool.close()


async def test_iterated_answer_larger_than_the_high_water_mark_arrives_whole() -> None:
    piece = b"y" * (64 << 10)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        for _ in range(48):  # 3 MB: reading pauses and resumes on the way
            w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()

    async def slow_reader(pool: Pool, url: str) -> int:
        ex = await pool.send(url, b"POST", b"/x", b"", b"{}")
        total = 0
        async for chunk in ex.chunks():
            total += len(chunk)
            await asyncio.sleep(0)  # a consumer that lets data pile up between reads
        return total

    async with upstream(script) as up:
        pool = Pool(2, 2)
        assert await asyncio.wait_for(slow_reader(pool, up.url), 10) == 48 * len(piece)
        await pool.close()


@pytest.mark.parametrize("chunked", [False, True])
async def test_read_at_most_gives_up_on_a_large_answer_and_leaves_it_to_relay(
    chunked: bool,
) -> None:
    piece = b"z" * (64 << 10)
    pieces = 32  # 2 MB

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        while True:  # keep-alive: the second request comes on the same connection
            await read_request(r)
            if chunked:
                w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
                for _ in range(pieces):
                    w.write(b"%x\r\n%s\r\n" % (len(piece), piece))
                    await w.drain()
                w.write(b"0\r\n\r\n")
            else:
                w.write(sized(piece * pieces))
            await w.drain()

    async def read(pool: Pool, url: str) -> tuple[bytes | None, int]:
        ex = await pool.send(url, b"POST", b"/x", b"", b"{}")
        first = await ex.read_at_most(1 << 20)
        total = 0
        async for chunk in ex.chunks():  # nothing lost: what was read first comes first
            total += len(chunk)
        return first, total

    async with upstream(script) as up:
        pool = Pool(2, 2)
        first, total = await asyncio.wait_for(read(pool, up.url), 10)
        assert first is None and total == pieces * len(piece)
        ex = await pool.send(up.url, b"POST", b"/x", b"", b"{}")
        # An answer within the limit is read whole.
        assert await asyncio.wait_for(ex.read_at_most(4 << 20), 10) == piece * pieces
        await pool.close()


@pytest.mark.parametrize("consumer", ["read_all", "pipe"])
async def test_an_unclaimed_answer_is_not_read_ahead_whole(consumer: str) -> None:
    """Until a consumer claims the body, reading stops a little past _HIGH_WATER: a router
    that read a fast upstream's 8 MB answer while still deciding what to do with it held
    all of it, per request (tests/security/test_memory.py failed on a fast machine)."""
    big = b"w" * (8 << 20)

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(sized(big))
        await w.drain()
        await r.read()

    async with upstream(script) as up:
        pool = Pool(2, 5)
        ex = await pool.send(up.url, b"POST", b"/x", b"", b"{}")
        await asyncio.sleep(0.3)  # the caller busy elsewhere: the upstream keeps sending
        assert ex._size <= _HIGH_WATER + (1 << 18)  # the cap plus at most one read
        if consumer == "read_all":
            assert await asyncio.wait_for(ex.read_all(), 10) == big
        else:
            sink = Collect()
            ex.pipe(sink)
            await asyncio.wait_for(sink.ended.wait(), 10)
            assert sink.error is None and b"".join(sink.reads) == big
        await pool.close()


async def test_request_carries_host_length_and_headers() -> None:
    seen: list[bytes] = []

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        head, body = await read_request(r)
        seen.append(head + body)
        w.write(sized(b"ok"))
        await w.drain()

    async with upstream(script) as up:
        pool = Pool(2, 5)
        await send(pool, up.url, b'{"model": "m"}')
        await pool.close()
    request = seen[0]
    assert request.startswith(b"POST /x HTTP/1.1\r\n")
    assert f"host: {up.url.removeprefix('http://')}".encode() in request
    assert b"content-length: 14\r\n" in request and b"content-type: application/json" in request
    assert request.endswith(b'\r\n\r\n{"model": "m"}')


async def test_connection_close_is_not_reused() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(sized(b"ok", b"connection: close\r\n"))
        await w.drain()

    async with upstream(script) as up:
        pool = Pool(2, 5)
        for _ in range(3):
            assert await send(pool, up.url) == b"ok"
        await pool.close()
    assert up.connections == 3


async def test_idle_connection_closed_by_upstream_is_retried_on_a_fresh_one() -> None:
    served = 0

    async def first_hangs_up(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        nonlocal served
        served += 1
        if served > 1:
            await echo_forever(r, w)
            return
        await read_request(r)
        w.write(sized(b"ok"))  # keep-alive promised...
        await w.drain()
        await read_request(r)  # ...then the next request is dropped with the connection,
        # the keep-alive race every pooled client meets: nothing was answered, so it is safe
        # to send again on a fresh connection.

    async with upstream(first_hangs_up) as up:
        pool = Pool(2, 5)
        assert await send(pool, up.url) == b"ok"
        assert await send(pool, up.url) == b"{}"
        await pool.close()
    assert up.connections == 2


async def test_chunked_answer_is_piped_one_call_per_read() -> None:
    release = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
                b"transfer-encoding: chunked\r\n\r\n")
        await w.drain()
        for i in range(3):
            await release.wait()
            release.clear()
            event = b"data: %d\n\n" % i
            w.write(b"%x\r\n%s\r\n" % (len(event), event))
            await w.drain()
        w.write(b"0\r\n\r\n")
        await w.drain()
        await r.read()  # keep the connection until the client is done

    async with upstream(script) as up:
        pool = Pool(2, 5)
        ex = await pool.send(up.url, b"POST", b"/x", b"", b"{}")
        assert ex.status == 200 and ex.length is None
        sink = Collect()
        ex.pipe(sink)
        for i in range(3):
            release.set()
            await sink.reads_at_least(i + 1)
            assert sink.reads[i] == b"data: %d\n\n" % i  # as it arrived, not batched
        await asyncio.wait_for(sink.ended.wait(), 5)
        assert sink.error is None
        await pool.close()


async def test_upstream_dying_mid_body_ends_the_pipe_with_an_error() -> None:
    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n5\r\nhello\r\n")
        await w.drain()

    async with upstream(script) as up:
        pool = Pool(2, 5)
        ex = await pool.send(up.url, b"POST", b"/x", b"", b"{}")
        sink = Collect()
        ex.pipe(sink)
        await asyncio.wait_for(sink.ended.wait(), 5)
        assert b"".join(sink.reads) == b"hello"
        assert isinstance(sink.error, UpstreamError)
        await pool.close()


async def test_unreachable_upstream_is_an_upstream_error() -> None:
    async with upstream(echo_forever) as up:
        url = up.url
    pool = Pool(2, 5)
    with pytest.raises(UpstreamError) as e:
        await send(pool, url)
    assert e.value.code == "upstream_unreachable"
    await pool.close()


async def test_a_connection_not_made_in_time_is_an_upstream_error() -> None:
    # A listener that never accepts, its queue full: the next connect waits for an answer
    # to its SYN that never comes. Nothing was sent, so it may be tried elsewhere (the
    # router's failover catches UpstreamError, and not a read timeout).
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        filled = []
        try:
            for _ in range(8):  # the kernel's queue for a backlog of 0 is one or two
                c = socket.socket()
                c.setblocking(False)
                c.connect_ex(("127.0.0.1", port))
                filled.append(c)
            pool = Pool(0.3, 5)
            with pytest.raises(UpstreamError) as e:
                await asyncio.wait_for(send(pool, f"http://127.0.0.1:{port}"), 5)
            assert e.value.code == "upstream_unreachable"
            assert "timed out" in e.value.message
            await pool.close()
        finally:
            for c in filled:
                c.close()


async def test_silent_upstream_times_out() -> None:
    async def silent(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        await r.read()  # answers nothing; returns when the client gives up

    async with upstream(silent) as up:
        pool = Pool(2, 0.3)
        with pytest.raises(UpstreamTimeout):
            await asyncio.wait_for(send(pool, up.url), 5)
        await pool.close()


async def test_closing_an_unfinished_exchange_closes_the_connection() -> None:
    peer_saw_eof = asyncio.Event()

    async def script(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n")
        await w.drain()
        if await r.read(1) == b"":
            peer_saw_eof.set()  # how the engine learns nobody reads its generation

    async with upstream(script) as up:
        pool = Pool(2, 5)
        ex = await pool.send(up.url, b"POST", b"/x", b"", b"{}")
        ex.close()
        await asyncio.wait_for(peer_saw_eof.wait(), 5)
        await pool.close()


async def test_cancelled_request_closes_its_connection() -> None:
    received = asyncio.Event()
    peer_saw_eof = asyncio.Event()

    async def slow(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        received.set()
        if await r.read(1) == b"":
            peer_saw_eof.set()

    async with upstream(slow) as up:
        pool = Pool(2, 5)
        task = asyncio.ensure_future(send(pool, up.url))
        await asyncio.wait_for(received.wait(), 5)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.wait_for(peer_saw_eof.wait(), 5)
        await pool.close()


async def test_invalid_response_is_an_upstream_error() -> None:
    async def garbage(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
        await read_request(r)
        w.write(b"NOT HTTP AT ALL\r\n\r\n")
        await w.drain()
        await r.read()

    async with upstream(garbage) as up:
        pool = Pool(2, 5)
        with pytest.raises(UpstreamError):
            await send(pool, up.url)
        await pool.close()


def test_only_http_urls() -> None:
    pool = Pool(2, 5)
    with pytest.raises(UpstreamError, match="only http://") as e:
        asyncio.run(send(pool, "https://example.invalid"))
    assert e.value.code == "upstream_unsupported"


async def test_the_pool_knows_when_an_upstream_last_answered() -> None:
    """heard_from: when response bytes last came from that upstream (the worker counts a
    health check that timed out while its engine answered as passing)."""
    async with upstream(echo_forever) as up:
        pool = Pool(2, 5)
        assert pool.heard_from(up.url) == 0.0
        before = asyncio.get_running_loop().time()
        await send(pool, up.url)
        heard = pool.heard_from(up.url)
        assert heard >= before
        assert pool.heard_from("http://127.0.0.1:1") == 0.0  # another upstream: never
        await send(pool, up.url)
        assert pool.heard_from(up.url) >= heard
        await pool.close()


async def test_an_upstream_on_a_unix_socket() -> None:
    """An engine on a Unix socket (the worker's default): requests go to its path, the
    connection is reused, and the pool hears from it under the same URL; once its
    connection is gone, nothing of it is left in the pool's idle lists."""
    up = Upstream(echo_forever)
    folder = tempfile.mkdtemp(dir="/tmp")  # pytest's own can be too deep for a socket
    path = os.path.join(folder, "engine.sock")
    server = await asyncio.start_unix_server(up._handle, path)
    url = unix_url(path)
    try:
        pool = Pool(2, 5)
        for i in range(3):
            assert await send(pool, url, b'{"i": %d}' % i) == b'{"i": %d}' % i
        assert up.connections == 1
        assert pool.heard_from(url) > 0.0
        assert list(pool._idle) == [(path, 0)]
        for conn in list(pool._idle[(path, 0)]):
            conn.abort()  # an engine stopped: its path is never used again
        assert pool._idle == {}
        await pool.close()
    finally:
        server.close()
        await server.wait_closed()
        shutil.rmtree(folder, ignore_errors=True)


async def test_upstreams_long_unheard_are_forgotten() -> None:
    """Pool.heard keeps what a health check asks about (the last seconds), not every engine
    that ever ran (each start on a socket is a new key)."""
    async with upstream(echo_forever) as up:
        pool = Pool(2, 0.2)  # swept every 0.05 s
        pool.heard = {(f"/gone/{i}.sock", 0): 1.0 for i in range(300)}
        await send(pool, up.url)  # starts the sweeper
        for _ in range(100):  # until swept, 2 s at most
            if len(pool.heard) == 1:
                break
            await asyncio.sleep(0.02)
        assert pool.heard_from(up.url) > 0.0
        assert len(pool.heard) == 1
        await pool.close()


async def test_a_unix_socket_nobody_listens_on_is_an_upstream_error(tmp_path: Path) -> None:
    pool = Pool(2, 5)
    with pytest.raises(UpstreamError, match="unix:") as e:
        await send(pool, unix_url(str(tmp_path / "gone.sock")))
    assert e.value.code == "upstream_unreachable"
    await pool.close()
