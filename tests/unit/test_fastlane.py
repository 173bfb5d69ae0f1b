"""The fast lane (shared/fastlane.py) on a real uvicorn server and real sockets: what the lane
answers itself, what it hands to the ASGI app, and how it ends on errors and disconnects."""

from __future__ import annotations

import asyncio
import contextlib
import socket
from collections.abc import AsyncIterator

import httpx
import orjson
import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from shared.edge import Limits
from shared.errors import BadRequest
from shared.fastlane import Handler, Lane, protocol_for
from shared.wire import Pool

LIMIT = 1000


class Lanes:
    """The handlers under test, and what they saw."""

    def __init__(self) -> None:
        self.cancelled = asyncio.Event()
        self.started = asyncio.Event()
        self.upstream = ""
        self.pool = Pool(2, 5)

    async def hot(self, lane: Lane) -> bool:
        body = await lane.read_body(LIMIT)
        if body is None or body == b"hand-back":
            return False
        if body == b"bad":
            raise BadRequest("bad body", param="x")
        if body == b"hang":
            self.started.set()
            try:
                await asyncio.Event().wait()  # until the disconnect cancels it
            except asyncio.CancelledError:
                self.cancelled.set()
                raise
        lane.respond(200, b"x-lane: 1\r\ncontent-type: text/plain\r\n", b"lane:" + body)
        return True

    async def relay(self, lane: Lane) -> bool:
        ex = await self.pool.send(self.upstream, b"POST", b"/", b"", b"{}")
        await lane.relay(ex)
        return True

    def pick(self, method: str, path: str) -> Handler | None:
        if method != "POST":
            return None
        return {"/hot": self.hot, "/relay": self.relay}.get(path)


async def _echo(request: Request) -> Response:
    return Response(b"asgi:" + await request.body(), media_type="text/plain")


LIMITS = Limits(header_bytes=32768, header_count=100, url_bytes=8192, header_timeout_s=10,
                body_timeout_s=60, keep_alive_s=5, connections=1000)


@contextlib.asynccontextmanager
async def server(lanes: Lanes) -> AsyncIterator[str]:
    app = Starlette(routes=[Route("/hot", _echo, methods=["POST"])])
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    config = uvicorn.Config(app, http=protocol_for(lanes.pick, LIMITS), log_config=None,
                            lifespan="off")
    srv = uvicorn.Server(config)
    task = asyncio.ensure_future(srv.serve(sockets=[sock]))
    async with asyncio.timeout(10):
        while not srv.started:
            await asyncio.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{sock.getsockname()[1]}"
    finally:
        srv.should_exit = True
        await task
        await lanes.pool.close()


async def test_hot_request_is_answered_on_the_lane_and_keeps_the_connection() -> None:
    lanes = Lanes()
    async with server(lanes) as url, httpx.AsyncClient(base_url=url) as client:
        for i in range(5):
            r = await client.post("/hot", content=b"%d" % i)
            assert r.status_code == 200 and r.headers["x-lane"] == "1"
            assert r.content == b"lane:%d" % i


async def test_handed_back_request_reaches_the_app_with_its_body() -> None:
    lanes = Lanes()
    async with server(lanes) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/hot", content=b"hand-back")
        assert r.content == b"asgi:hand-back" and "x-lane" not in r.headers
        # Chunked upload (no Content-Length) and a body over the limit go to the app too.
        r = await client.post("/hot", content=_parts(b"a", b"b"))
        assert r.content == b"asgi:ab"
        r = await client.post("/hot", content=b"x" * (LIMIT + 1))
        assert r.content == b"asgi:" + b"x" * (LIMIT + 1)


async def _parts(*parts: bytes) -> AsyncIterator[bytes]:
    for p in parts:
        yield p


async def test_api_error_is_answered_in_the_openai_shape() -> None:
    lanes = Lanes()
    async with server(lanes) as url, httpx.AsyncClient(base_url=url) as client:
        r = await client.post("/hot", content=b"bad")
        assert r.status_code == 400
        assert r.json() == {"error": {"message": "bad body", "type": "invalid_request_error",
                                      "param": "x", "code": "invalid_request"}}
        assert (await client.post("/hot", content=b"ok")).content == b"lane:ok"


async def test_pipelined_requests_are_answered_in_order() -> None:
    lanes = Lanes()
    async with server(lanes) as url:
        host, port = url.removeprefix("http://").split(":")
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"".join(b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 1\r\n\r\n%d" % i
                         for i in range(3)))
        await w.drain()
        data = b""
        while data.count(b"\r\n\r\nlane:") < 3:
            chunk = await asyncio.wait_for(r.read(65536), 5)
            assert chunk, data
            data += chunk
        assert data.index(b"lane:0") < data.index(b"lane:1") < data.index(b"lane:2")
        w.close()


async def test_client_disconnect_cancels_the_handler() -> None:
    lanes = Lanes()
    async with server(lanes) as url:
        host, port = url.removeprefix("http://").split(":")
        _, w = await asyncio.open_connection(host, int(port))
        w.write(b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 4\r\n\r\nhang")
        await w.drain()
        await asyncio.wait_for(lanes.started.wait(), 5)
        w.close()
        await asyncio.wait_for(lanes.cancelled.wait(), 5)


async def _sse_upstream(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    await r.readexactly(2)
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\nx-request-id: abc\r\n"
            b"connection: keep-alive\r\ntransfer-encoding: chunked\r\n\r\n")
    for i in range(3):
        event = b"data: %d\n\n" % i
        w.write(b"%x\r\n%s\r\n" % (len(event), event))
        await w.drain()
    w.close()  # dies before the final chunk


async def test_relay_passes_events_and_ends_a_broken_stream_with_an_error_event() -> None:
    lanes = Lanes()
    up = await asyncio.start_server(_sse_upstream, "127.0.0.1", 0)
    lanes.upstream = f"http://127.0.0.1:{up.sockets[0].getsockname()[1]}"
    try:
        async with (server(lanes) as url, httpx.AsyncClient(base_url=url) as client,
                    client.stream("POST", "/relay", content=b"{}") as r):
            assert r.headers["content-type"] == "text/event-stream"
            assert r.headers["x-request-id"] == "abc"
            assert "connection" not in r.headers  # hop-by-hop headers stay behind
            events = [e async for e in r.aiter_lines() if e]
        assert events[:3] == ["data: 0", "data: 1", "data: 2"]
        last = orjson.loads(events[3].removeprefix("data: "))
        assert last["error"]["code"] == "stream_interrupted"
    finally:
        up.close()
        await up.wait_closed()


async def test_expect_100_continue_is_answered_before_the_body() -> None:
    lanes = Lanes()
    async with server(lanes) as url:
        host, port = url.removeprefix("http://").split(":")
        r, w = await asyncio.open_connection(host, int(port))
        w.write(b"POST /hot HTTP/1.1\r\nhost: x\r\ncontent-length: 2\r\n"
                b"expect: 100-continue\r\n\r\n")
        await w.drain()
        assert await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5) == \
            b"HTTP/1.1 100 Continue\r\n\r\n"
        w.write(b"ok")
        await w.drain()
        head = await asyncio.wait_for(r.readuntil(b"\r\n\r\n"), 5)
        assert head.startswith(b"HTTP/1.1 200") and await r.readexactly(7) == b"lane:ok"
        w.close()
