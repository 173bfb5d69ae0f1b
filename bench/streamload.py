"""Streaming load client: N concurrent SSE streams on keep-alive connections, for a duration.

    python -m bench.streamload --url URL --body-file F --streams 64 --duration 5 --out R.json

A raw asyncio HTTP/1.1 client (uvloop): ``data_received`` is called once per socket read, so
it sees exactly how events arrived. A read that completes more than one SSE event means the
events were coalesced somewhere on the way (by a proxy buffering, or by a slow reader).

Per stream: TTFT = request written -> first complete event (the connection is already open);
gaps = time between successive reads that completed at least one event. Only streams that
start after the warm-up are measured; chunks/s counts events completed inside the window.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import resource
import time
from dataclasses import dataclass, field
from pathlib import Path
from urllib.parse import urlsplit

import uvloop

_STREAM_TIMEOUT_S = 60.0


@dataclass
class Totals:
    """Everything measured, across streams."""

    ttft: list[float] = field(default_factory=list)
    gaps: list[float] = field(default_factory=list)
    streams: int = 0  # measured: started inside the window
    completed: int = 0  # all, warm-up and drain included (what the servers' CPU paid for)
    errors: int = 0
    events: int = 0  # completed inside the window
    coalesced: int = 0  # of those, arrived in a read that completed more than one
    coalesced_final: int = 0  # of those, in the read that ended the stream ([DONE])
    reads: int = 0


@dataclass
class Window:
    start: float
    end: float

    def holds(self, t: float) -> bool:
        return self.start <= t <= self.end


class Response:
    """Incremental HTTP/1.1 response parser: head, then chunked or sized body."""

    def __init__(self) -> None:
        self.head = b""
        self.status = 0
        self.chunked = False
        self.left = -1  # bytes left of the current chunk (or of a sized body)
        self.raw = b""  # unparsed chunk framing
        self.complete = False
        self.keep_alive = True

    def feed(self, data: bytes) -> bytes:
        """Consume ``data``; return the body payload bytes it carried."""
        if not self.status:
            self.head += data
            end = self.head.find(b"\r\n\r\n")
            if end < 0:
                return b""
            self._parse_head(self.head[:end])
            data, self.head = self.head[end + 4:], b""
        return self._chunked(data) if self.chunked else self._sized(data)

    def _parse_head(self, head: bytes) -> None:
        lines = head.split(b"\r\n")
        self.status = int(lines[0].split()[1])
        for line in lines[1:]:
            name, _, value = line.partition(b":")
            name, value = name.strip().lower(), value.strip().lower()
            if name == b"transfer-encoding" and b"chunked" in value:
                self.chunked = True
            elif name == b"content-length":
                self.left = int(value)
            elif name == b"connection" and value == b"close":
                self.keep_alive = False
        if not self.chunked and self.left < 0:
            self.keep_alive = False  # body ends at EOF

    def _sized(self, data: bytes) -> bytes:
        if self.left >= 0:
            data = data[: self.left]
            self.left -= len(data)
            self.complete = self.left == 0
        return data

    def _chunked(self, data: bytes) -> bytes:
        self.raw += data
        out = []
        while True:
            if self.left > 0:
                piece = self.raw[: self.left]
                out.append(piece)
                self.left -= len(piece)
                self.raw = self.raw[len(piece):]
                if self.left > 0:
                    break
                self.left = -2  # the CRLF after the chunk
            if self.left == -2:
                if len(self.raw) < 2:
                    break
                self.raw, self.left = self.raw[2:], -1
            end = self.raw.find(b"\r\n")
            if end < 0:
                break
            size = int(self.raw[:end].split(b";")[0], 16)
            self.raw = self.raw[end + 2:]
            if size == 0:
                self.complete = True  # trailers, if any, are ignored
                break
            self.left = size
        return b"".join(out)


class Stream:
    """Measurements of one streamed response as its reads arrive."""

    def __init__(self, sent: float) -> None:
        self.sent = sent
        self.response = Response()
        self.pending = b""
        self.first = 0.0
        self.last = 0.0
        self.gaps: list[float] = []
        self.done_seen = False

    def on_read(self, data: bytes, now: float, totals: Totals, window: Window) -> None:
        payload = self.response.feed(data)
        if not payload:
            return
        self.pending += payload
        n = self.pending.count(b"\n\n")
        if not n:
            return
        cut = self.pending.rfind(b"\n\n") + 2
        final = b"[DONE]" in self.pending[:cut]
        self.done_seen = self.done_seen or final
        self.pending = self.pending[cut:]
        if self.first:
            self.gaps.append(now - self.last)
        else:
            self.first = now
        self.last = now
        if window.holds(now):
            totals.reads += 1
            totals.events += n
            totals.coalesced += n if n > 1 else 0
            totals.coalesced_final += n if n > 1 and final else 0


class Connection(asyncio.Protocol):
    def __init__(self, totals: Totals, window: Window) -> None:
        self.totals = totals
        self.window = window
        self.transport: asyncio.Transport | None = None
        self.stream: Stream | None = None
        self.finished: asyncio.Future[bool] | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        # uvloop's transports are not asyncio.Transport subclasses; they quack the same.
        self.transport = transport  # type: ignore[assignment]

    def data_received(self, data: bytes) -> None:
        now = time.perf_counter()
        stream, finished = self.stream, self.finished
        if stream is None or finished is None or finished.done():
            return
        stream.on_read(data, now, self.totals, self.window)
        if stream.response.complete:
            finished.set_result(True)

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None
        if self.finished is not None and not self.finished.done():
            # A body that ends at EOF is complete here; anything else was cut.
            resp = self.stream.response if self.stream else None
            ok = resp is not None and resp.status > 0 and not resp.keep_alive and exc is None
            self.finished.set_result(ok)

    async def send(self, request: bytes) -> Stream:
        assert self.transport is not None
        loop = asyncio.get_running_loop()
        self.finished = loop.create_future()
        self.stream = Stream(time.perf_counter())
        self.transport.write(request)
        ok = await asyncio.wait_for(self.finished, _STREAM_TIMEOUT_S)
        stream = self.stream
        if not (ok and stream.response.status == 200 and stream.done_seen):
            raise ConnectionError(f"stream failed (status {stream.response.status})")
        return stream


def build_request(url: str, body: bytes) -> tuple[str, int, bytes]:
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    head = (f"POST {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n"
            f"Content-Type: application/json\r\nAccept: text/event-stream\r\n"
            f"Content-Length: {len(body)}\r\n\r\n")
    return host, port, head.encode() + body


async def user(
    target: tuple[str, int, bytes], totals: Totals, window: Window, stop_at: float,
    delay_s: float = 0.0,
) -> None:
    """One client: streams back to back on one keep-alive connection until ``stop_at``,
    the first one ``delay_s`` after the start."""
    host, port, request = target
    loop = asyncio.get_running_loop()
    conn: Connection | None = None
    if delay_s > 0:
        await asyncio.sleep(delay_s)
    while time.perf_counter() < stop_at:
        if conn is None or conn.transport is None:
            _, conn = await loop.create_connection(lambda: Connection(totals, window), host, port)
        try:
            stream = await conn.send(request)
        except (ConnectionError, TimeoutError):
            totals.errors += 1
            if conn.transport is not None:
                conn.transport.close()
            conn = None
            await asyncio.sleep(0.01)
            continue
        totals.completed += 1
        if stream.sent >= window.start:
            totals.streams += 1
            totals.ttft.append(stream.first - stream.sent)
            totals.gaps.extend(stream.gaps)
        if not stream.response.keep_alive and conn.transport is not None:
            conn.transport.close()
    if conn is not None and conn.transport is not None:
        conn.transport.close()


async def probe(url: str, window: Window, every_s: float, out: list[float]) -> None:
    """GET ``url`` every ``every_s`` on one keep-alive connection; the latencies of those sent
    inside the window go to ``out``. A trivial request to one process: how long a new
    request waits for that process's event loop (its lag) while the streams run."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    request = f"GET {parts.path} HTTP/1.1\r\nHost: {host}:{port}\r\n\r\n".encode()
    reader, writer = await asyncio.open_connection(host, port)
    try:
        while time.perf_counter() < window.end:
            sent = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                name, _, value = line.partition(b":")
                if name.strip().lower() == b"content-length":
                    length = int(value)
            await reader.readexactly(length)
            if window.holds(sent):
                out.append(time.perf_counter() - sent)
            await asyncio.sleep(every_s)
    finally:
        writer.close()


def percentile(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q / 100 * len(ordered)))]


async def run(url: str, body: bytes, streams: int, duration_s: float, ramp_s: float = 0.0,
              warmup_s: float | None = None, probes: dict[str, str] | None = None,
              ) -> dict[str, float]:
    """With ``ramp_s``, client i starts its first stream i/N of it late: long streams then
    begin and end spread evenly over time (a steady arrival rate, as from many users), not
    all N at once every stream length (a burst that measures how fast a backlog clears)."""
    target = build_request(url, body)
    totals = Totals()
    now = time.perf_counter()
    warmup = min(1.0, 0.2 * duration_s) if warmup_s is None else warmup_s
    window = Window(now + warmup, now + warmup + duration_s)
    cpu0 = resource.getrusage(resource.RUSAGE_SELF)
    lags: dict[str, list[float]] = {name: [] for name in probes or {}}
    await asyncio.gather(*(user(target, totals, window, window.end, ramp_s * i / streams)
                           for i in range(streams)),
                         *(probe(u, window, 0.05, lags[n]) for n, u in (probes or {}).items()))
    cpu1 = resource.getrusage(resource.RUSAGE_SELF)
    wall = time.perf_counter() - now
    client_cpu = (cpu1.ru_utime - cpu0.ru_utime) + (cpu1.ru_stime - cpu0.ru_stime)
    return {
        "streams": totals.streams,
        "completed": totals.completed,
        "errors": totals.errors,
        "chunks_per_s": totals.events / duration_s,
        "ttft_p50_ms": percentile(totals.ttft, 50) * 1000,
        "ttft_p99_ms": percentile(totals.ttft, 99) * 1000,
        "gap_p50_ms": percentile(totals.gaps, 50) * 1000,
        "gap_p99_ms": percentile(totals.gaps, 99) * 1000,
        "coalesced_share": totals.coalesced / totals.events if totals.events else 0.0,
        # Which part of that share is the streams' last read: the engine writes its last
        # events back to back, so they often arrive together even when read directly.
        "coalesced_final_share": totals.coalesced_final / totals.events if totals.events
        else 0.0,
        "events_per_read": totals.events / totals.reads if totals.reads else 0.0,
        # Near 1.0 would mean the client, not the servers, limits the rate.
        "client_cpu_busy": client_cpu / wall,
    } | {f"probe_{name}_{q}_ms": percentile(v, q) * 1000 for name, v in lags.items()
         for q in (50, 99)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--url", required=True)
    ap.add_argument("--body-file", type=Path, required=True)
    ap.add_argument("--streams", type=int, required=True)
    ap.add_argument("--duration", type=float, required=True)
    ap.add_argument("--out", type=Path, required=True)
    ap.add_argument("--ramp", type=float, default=0.0,
                    help="spread the clients' first streams over this many seconds")
    ap.add_argument("--warmup", type=float, default=None,
                    help="seconds before the measured window (default: min(1, duration/5))")
    ap.add_argument("--probe", action="append", default=[], metavar="NAME=URL",
                    help="also GET URL every 50 ms and report its latency (repeatable)")
    args = ap.parse_args()
    body = args.body_file.read_bytes()
    probes = dict(p.split("=", 1) for p in args.probe)
    result = uvloop.run(run(args.url, body, args.streams, args.duration, args.ramp, args.warmup,
                            probes))
    args.out.write_text(json.dumps(result))


if __name__ == "__main__":
    main()
