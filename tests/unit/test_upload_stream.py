"""The leading fields of a multipart upload found as it arrives (shared/multipart.FieldScanner)
and the upload relayed piece by piece (shared/upload), against real sockets for the wire."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest

from shared.errors import BadRequest, PayloadTooLarge
from shared.multipart import FieldScanner
from shared.upload import Upload, read_fields
from shared.wire import Pool

B = b"bnd"


def form(*parts: tuple[str, bytes, bool]) -> bytes:
    """(name, value, is_file) parts as a multipart body with boundary ``bnd``."""
    out = b""
    for name, value, is_file in parts:
        extra = b'; filename="a.wav"\r\ncontent-type: audio/wav' if is_file else b""
        out += b'--bnd\r\ncontent-disposition: form-data; name="%s"%s\r\n\r\n%s\r\n' % (
            name.encode(), extra, value)
    return out + b"--bnd--\r\n"


def scan(body: bytes, piece: int, bound: int = 1 << 20) -> tuple[dict[str, str], int]:
    """The fields, and how many bytes were fed before the scanner had them."""
    s = FieldScanner(B, ("model", "stream"), bound)
    for i in range(0, len(body), piece):
        if s.feed(body[i:i + piece], i + piece >= len(body)):
            return s.fields, min(i + piece, len(body))
    raise AssertionError("never done")


OPENAI_ORDER = form(("model", b"whisper", False), ("response_format", b"json", False),
                    ("stream", b"true", False), ("file", b"\x01" * 5000, True))


@pytest.mark.parametrize("piece", [1, 7, 100, 1 << 20])
def test_openai_order_is_known_before_the_file_arrives(piece: int) -> None:
    fields, fed = scan(OPENAI_ORDER, piece)
    assert fields == {"model": "whisper", "stream": "true"}
    assert fed < len(OPENAI_ORDER) or piece >= len(OPENAI_ORDER)
    if piece == 1:
        # Done as soon as the part after `stream` begins: no byte of the file was needed.
        assert fed == OPENAI_ORDER.index(b"--bnd", OPENAI_ORDER.index(b"true")) + len(b"--bnd")


def test_model_without_stream_stops_at_the_file() -> None:
    body = form(("model", b"m", False), ("file", b"\x02" * 9000, True))
    fields, fed = scan(body, 10)
    assert fields == {"model": "m"} and fed < 200


def test_model_after_the_file_is_found_within_the_bound_and_refused_beyond_it() -> None:
    body = form(("file", b"\x03" * 3000, True), ("model", b"late", False))
    for piece in (1, 50, len(body)):
        assert scan(body, piece, bound=len(body))[0] == {"model": "late"}
        with pytest.raises(BadRequest, match="must come before the file"):
            scan(body, piece, bound=1000)


@pytest.mark.parametrize(("body", "words"), [
    (b"garbage that is long enough", "does not start with its boundary"),
    (b"--bnd\r\ncontent-disposition: form-data; name=\"model\"\r\n\r\nm", "not terminated"),
    (b"--bnd\r\ncontent-disposition: form-data; name=\"model\"", "headers are not"),
    (b"--b", "does not start"),
])
def test_malformed_bodies_are_a_400(body: bytes, words: str) -> None:
    with pytest.raises(BadRequest, match=words):
        scan(body, 3)


def test_a_body_without_model_ends_with_no_fields() -> None:
    assert scan(form(("file", b"x", True)), 4)[0] == {}


async def _pieces(parts: list[bytes], gate: asyncio.Event | None = None
                  ) -> AsyncIterator[bytes]:
    for i, p in enumerate(parts):
        if i == 1 and gate is not None:
            await gate.wait()
        yield p


async def test_read_fields_reads_only_the_head_and_limits_as_it_goes() -> None:
    cut = OPENAI_ORDER.index(b"\x01")  # the file's first byte
    parts = [OPENAI_ORDER[:cut], OPENAI_ORDER[cut:3000], OPENAI_ORDER[3000:]]
    fields, up = await read_fields(_pieces(parts), "multipart/form-data; boundary=bnd", None,
                                   limit=1 << 20, bound=3000)
    assert fields["model"] == "whisper" and bytes(up.head) == parts[0] and up.replayable
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    # Kept while what was sent after the head is within the bound, then let go.
    assert await up.next_piece(never) == parts[1]
    assert up.replayable and up.kept == [parts[1]]
    assert await up.next_piece(never) == parts[2]
    assert not up.replayable and up.kept == []
    counted = Upload(_pieces([b"x" * 10, b"y" * 10]), 15, None)
    assert await counted.extend_head() == b"x" * 10
    with pytest.raises(PayloadTooLarge, match="larger than 15 bytes"):  # counted as it comes
        await counted.extend_head()
    with pytest.raises(PayloadTooLarge, match="larger than 100 bytes"):
        await read_fields(_pieces(parts), "multipart/form-data; boundary=bnd", "101",
                          limit=100, bound=1 << 20)


async def test_a_piece_read_while_the_upstream_answered_is_kept_for_the_next_try() -> None:
    gate = asyncio.Event()
    up = Upload(_pieces([b"head", b"second"], gate), 100, None)
    await up.extend_head()
    answered: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    task = asyncio.ensure_future(up.next_piece(answered))
    await asyncio.sleep(0.01)
    answered.set_result(None)
    assert await task is None and up.replayable  # nothing taken: a retry may send it all
    gate.set()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await up.next_piece(never) == b"second"
    assert await up.next_piece(never) is None and up.ended
    up.close()


async def _server(received: list[bytes], first_seen: asyncio.Event,
                  answer_early: bool) -> tuple[asyncio.Server, int]:
    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        head = await reader.readuntil(b"\r\n\r\n")
        received.append(head)
        length = int(head.lower().split(b"content-length: ")[1].split(b"\r\n")[0])
        got = b""
        if answer_early:
            got = await reader.read(10)
            received.append(got)
            writer.write(b"HTTP/1.1 400 Bad Request\r\ncontent-length: 2\r\n\r\nno")
            await writer.drain()
            return
        while len(got) < length:
            chunk = await reader.read(65536)
            if not chunk:
                break
            got += chunk
            first_seen.set()
        received.append(got)
        writer.write(b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%d" % (
            len(str(len(got))), len(got)))
        await writer.drain()

    server = await asyncio.start_server(serve, "127.0.0.1", 0)
    return server, server.sockets[0].getsockname()[1]


async def test_send_stream_sends_pieces_as_they_come_and_frames_by_length() -> None:
    received: list[bytes] = []
    first = asyncio.Event()
    server, port = await _server(received, first, answer_early=False)
    gate = asyncio.Event()
    body = [b"a" * 1000, b"b" * 200_000]
    up = Upload(_pieces(body, gate), 1 << 20, sum(map(len, body)))
    await up.extend_head()
    pool = Pool(2.0, 10.0)
    try:
        sending = asyncio.ensure_future(pool.send_stream(
            f"http://127.0.0.1:{port}", b"POST", b"/x", b"x-a: 1\r\n", up))
        await asyncio.wait_for(first.wait(), 5)  # the head arrived before the rest existed
        gate.set()
        ex = await sending
        assert (ex.status, await ex.read_all()) == (200, b"201000")
        assert received[1] == b"a" * 1000 + b"b" * 200_000
    finally:
        await pool.close()
        server.close()


async def test_an_early_answer_stops_the_upload_and_is_returned() -> None:
    received: list[bytes] = []
    server, port = await _server(received, asyncio.Event(), answer_early=True)
    gate = asyncio.Event()  # never set: the rest of the body never comes
    up = Upload(_pieces([b"z" * 10, b"never"], gate), 1 << 20, 15)
    await up.extend_head()
    pool = Pool(2.0, 10.0)
    try:
        ex = await asyncio.wait_for(pool.send_stream(
            f"http://127.0.0.1:{port}", b"POST", b"/x", b"", up), 5)
        assert (ex.status, await ex.read_all()) == (400, b"no")
        assert up.replayable  # nothing beyond the head was taken
    finally:
        up.close()
        await pool.close()
        server.close()


def test_a_long_part_without_a_filename_after_model_is_not_waited_for() -> None:
    # curl -F "file=<a.wav" sends the file as a plain field, without a filename.
    body = form(("model", b"m", False), ("file", b"\x04" * 50_000, False),
                ("stream", b"true", False))
    fields, fed = scan(body, 500)
    assert fields == {"model": "m"} and fed < 3000


async def test_a_retry_sends_the_kept_pieces_again_and_then_the_rest() -> None:
    first_seen = asyncio.Event()
    received: list[bytes] = []
    server, port = await _server(received, first_seen, answer_early=False)
    body = [b"h" * 10, b"k" * 100, b"r" * 50]
    up = Upload(_pieces(body), 1 << 20, 160, keep=100)
    await up.extend_head()
    never: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    assert await up.next_piece(never) == body[1]  # as a try that then failed had taken it
    assert up.replayable and up.kept == [body[1]]
    pool = Pool(2.0, 10.0)
    try:
        ex = await pool.send_stream(f"http://127.0.0.1:{port}", b"POST", b"/x", b"", up)
        assert (ex.status, await ex.read_all()) == (200, b"160")
        assert received[1] == b"".join(body)  # the whole body, in order
        assert not up.replayable  # 150 bytes after the head: past keep
    finally:
        await pool.close()
        server.close()
