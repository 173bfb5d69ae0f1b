"""shared/forwarding.py's relay through the ASGI app: its ``on_close`` runs once the answer is
over, however it ended (an in-flight count or an admission slot hangs on it)."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from starlette.responses import Response
from starlette.types import Message

from shared.forwarding import Ending, relay, when_over
from shared.wire import Exchange, Pool


async def _slow_sse(r: asyncio.StreamReader, w: asyncio.StreamWriter) -> None:
    await r.readuntil(b"\r\n\r\n")
    await r.readexactly(2)
    w.write(b"HTTP/1.1 200 OK\r\ncontent-type: text/event-stream\r\n"
            b"transfer-encoding: chunked\r\n\r\n")
    for i in range(2):
        event = b"data: %d\n\n" % i
        w.write(b"%x\r\n%s\r\n" % (len(event), event))
        await w.drain()
        await asyncio.sleep(0.05)
    if r.at_eof():
        return
    await asyncio.sleep(30)  # then silent: the answer is over only when it is ended


@asynccontextmanager
async def answer() -> AsyncIterator[Exchange]:
    """A streamed answer arriving from a slow upstream, its headers in."""
    server = await asyncio.start_server(_slow_sse, "127.0.0.1", 0)
    pool = Pool(2, 30)
    try:
        url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        yield await pool.send(url, b"POST", b"/", b"", b"{}")
    finally:
        await pool.close()
        server.close()


class Client:
    """An ASGI server's side of one response: what was sent, and a disconnect on demand."""

    def __init__(self) -> None:
        self.sent: list[Message] = []
        self.gone = asyncio.Event()
        self.body = asyncio.Event()

    async def send(self, message: Message) -> None:
        self.sent.append(message)
        if message.get("body"):
            self.body.set()

    async def receive(self) -> Message:
        await self.gone.wait()
        return {"type": "http.disconnect"}


async def sending(response: Response, client: Client) -> asyncio.Task[None]:
    """``response`` being sent to ``client``, once its first body bytes went out."""
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))
    await asyncio.wait_for(client.body.wait(), 5)
    return task


SCOPE = {"type": "http", "asgi": {"version": "3.0", "spec_version": "2.3"},
         "http_version": "1.1", "method": "POST", "path": "/"}


async def test_on_close_runs_once_when_the_answer_is_cancelled() -> None:
    closed: list[int] = []
    async with answer() as ex:
        response = relay(ex, on_close=lambda: closed.append(1))
        # What the router hangs on a key's streamed answer: its ticket's end.
        when_over(response, lambda: closed.append(2))
        client = Client()
        task = await sending(response, client)
        task.cancel()  # what a shutdown's timeout does to a request still streaming
        await asyncio.gather(task, return_exceptions=True)
        assert closed == [1, 2]
        assert ex._conn is None  # the upstream connection was closed, stopping the engine


async def test_on_close_runs_once_when_the_client_goes() -> None:
    closed: list[int] = []
    async with answer() as ex:
        response = relay(ex, on_close=lambda: closed.append(1))
        client = Client()
        task = await sending(response, client)
        client.gone.set()
        await asyncio.wait_for(task, 5)
        assert closed == [1]


async def test_a_failing_cleanup_does_not_skip_the_next() -> None:
    closed: list[int] = []

    def broken() -> None:
        raise RuntimeError("release failed")

    async with answer() as ex:
        response = relay(ex, on_close=broken)
        when_over(response, lambda: closed.append(2))
        client = Client()
        task = await sending(response, client)
        client.gone.set()
        await asyncio.wait_for(task, 5)
        assert closed == [2]


async def test_a_streamed_answer_whose_body_fails_still_runs_what_hangs_on_its_end() -> None:
    # The router's held stream is such an answer; a key's concurrency slot hangs on its end,
    # which a Starlette background task would skip when the body raises.
    closed: list[int] = []

    async def failing() -> AsyncIterator[bytes]:
        yield b": waiting\n\n"
        raise RuntimeError("the wait failed")

    response = Ending(failing(), media_type="text/event-stream",
                      over=lambda: closed.append(1))
    when_over(response, lambda: closed.append(2))
    client = Client()
    task = asyncio.create_task(response(SCOPE, client.receive, client.send))
    done = await asyncio.gather(task, return_exceptions=True)
    assert isinstance(done[0], BaseException)  # the failure is not hidden
    assert closed == [1, 2]
    assert client.sent[1]["body"] == b": waiting\n\n"
