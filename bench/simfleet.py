"""Thousands of simulated workers' control traffic from one process, on one raw connection.

    python -m bench.simfleet --redis URL --prefix P --workers 5000 --duration 60 --out F

``bench.simworkers`` runs each simulated worker through the real store code (redis-py, a
round trip per call): ~100 µs of client CPU per call, so 5,000 workers (7,500 calls a second)
need more than the two cores this machine has, and a run measured workers dying. This plays
the same workers with the commands those calls send (a heartbeat that reports nothing new:
``SET alive PX XX``; a full one, every RESYNC_S: ``WATCH`` and ``EXISTS`` of the record,
then ``MULTI`` ``SET alive PX GET`` ``HSET`` ``SADD`` ``EXEC``, ``MULTI`` ``SADD``
``HINCRBY worker:revs`` ``EXEC`` and the pool's size, ``SCARD workers``; the assignment
check, every HINTED_POLL_S as a worker with hints on and none for it: ``HGET
assign:versions`` and ``GET version:models``; the beats, the full beats and that check
stretched by the pace that pool size gives, shared/pace.py, as the real
worker does; on a change, or every RESYNC_S (paced too), the re-read:
``MULTI HGETALL assign HKEYS ledger EXEC``, then each assigned model's ``HGETALL`` and hold's
``GET``), encoded once into RESP and sent every 0.1 s as one pipeline on one connection,
replies parsed by hiredis: a few µs of client CPU per command.

Redis does the same commands as for real workers, but pipelined on one connection instead of
one round trip per worker on thousands: its CPU per command is lower than with real workers
(fewer reads, writes and wake-ups), so its figures here are a lower bound. The output file is
the same as ``bench.simworkers``' (ticks done and due).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections import Counter
from pathlib import Path
from urllib.parse import urlparse

import hiredis

from bench.simworkers import DEFAULTS, HEARTBEAT_S, RESYNC_S, TTL_S, cli, worker_id
from services.worker.assignments import HINTED_POLL_S
from shared.keys import Keys
from shared.pace import pool_pace

TICK_S = 0.1
Command = tuple[bytes, ...]


def encode(cmds: list[Command]) -> bytes:
    out = bytearray()
    for args in cmds:
        out += b"*%d\r\n" % len(args)
        for a in args:
            out += b"$%d\r\n%s\r\n" % (len(a), a)
    return bytes(out)


class Conn:
    """One pipelined RESP connection: send commands, get their replies in order."""

    def __init__(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.reader, self.writer = reader, writer
        self.parser = hiredis.Reader(encoding="utf-8", errors="replace")

    @classmethod
    async def open(cls, url: str) -> Conn:
        u = urlparse(url)
        reader, writer = await asyncio.open_connection(u.hostname or "127.0.0.1", u.port or 6379)
        conn = cls(reader, writer)
        db = (u.path or "/0").lstrip("/") or "0"
        if db != "0":
            await conn.run([(b"SELECT", db.encode())])
        return conn

    async def run(self, cmds: list[Command]) -> list[object]:
        if not cmds:
            return []
        self.writer.write(encode(cmds))
        replies: list[object] = []
        while len(replies) < len(cmds):
            got = self.parser.gets()
            if got is False:
                data = await self.reader.read(1 << 20)
                if not data:
                    raise ConnectionError("redis closed the connection")
                self.parser.feed(data)
                continue
            replies.append(got)
        return replies


class Fleet:
    def __init__(self, keys: Keys, ids: list[str], max_per_s: float | None = None) -> None:
        self.k = keys
        self.ids = ids
        self.done: Counter[str] = Counter()
        n = len(ids)
        now = time.monotonic()
        # Spread evenly over the intervals, as bench.simworkers does.
        self.beat_at = {w: now + i / n * HEARTBEAT_S for i, w in enumerate(ids)}
        # Each worker's first beat is a full one (a worker's first after it starts is).
        self.full_at = dict.fromkeys(ids, 0.0)
        # Real workers start at different times, so their RESYNC_S safety nets (full beats,
        # full re-reads) are spread over the period; started together here, each worker's
        # second full beat and re-read come after its share of the period, then every period.
        self.phase = {w: (i + 1) / n for i, w in enumerate(ids)}
        self.check_at = {w: now + i / n * HINTED_POLL_S for i, w in enumerate(ids)}
        self.stamp: dict[str, tuple[object, object]] = {}
        self.read_at: dict[str, float] = {}
        load = json.dumps({"instances": 10.0}).encode()
        self.fields = (b"load", load, b"gpus", b"[]", b"gpu_message", b"no GPU (simulated)")
        # As a real worker: unpaced until a full beat tells it the pool's size.
        self.pace = 1.0
        self.settings = DEFAULTS if max_per_s is None else DEFAULTS.model_copy(
            update={"heartbeat_max_per_s": max_per_s})

    def _beat(self, w: str, now_wall: bytes, full: bool) -> list[Command]:
        k = self.k
        ttl = str(int(TTL_S * self.pace * 1000)).encode()
        alive = k.worker_alive(w).encode()
        if not full:
            return [(b"SET", alive, now_wall, b"PX", ttl, b"XX")]
        return [(b"WATCH", k.worker(w).encode()), (b"EXISTS", k.worker(w).encode()), (b"MULTI",),
                (b"SET", alive, now_wall, b"PX", ttl, b"GET"),
                (b"HSET", k.worker(w).encode(), *self.fields, b"last_seen", now_wall),
                (b"SADD", k.workers.encode(), w.encode()), (b"EXEC",),
                (b"MULTI",), (b"SADD", k.workers.encode(), w.encode()),
                (b"HINCRBY", k.worker_revs.encode(), w.encode(), b"1"), (b"EXEC",),
                (b"SCARD", k.workers.encode())]

    async def tick(self, conn: Conn) -> None:
        now = time.monotonic()
        now_wall = repr(time.time()).encode()
        cmds: list[Command] = []
        beating = [w for w, at in self.beat_at.items() if at <= now]
        counted = -1  # where the reply of the tick's last SCARD (a full beat's) will be
        for w in beating:
            full = self.full_at[w] <= now
            cmds += self._beat(w, now_wall, full)
            self.beat_at[w] += HEARTBEAT_S * self.pace
            if full:
                first = self.full_at[w] == 0.0
                self.full_at[w] = now + RESYNC_S * self.pace * (self.phase[w] if first else 1)
                counted = len(cmds) - 1
        sent = len(cmds)
        checking = [w for w, at in self.check_at.items() if at <= now]
        for w in checking:
            cmds += [(b"HGET", self.k.assign_versions.encode(), w.encode()),
                     (b"GET", self.k.models_version.encode())]
            self.check_at[w] += HINTED_POLL_S * self.pace
        replies = await conn.run(cmds)
        if counted >= 0:  # the pool's size, hence the pace
            size = replies[counted]
            self.pace = pool_pace(int(size) if isinstance(size, int) else 0, self.settings)
        self.done["heartbeats"] += len(beating)
        stamps = replies[sent:]
        stale = []
        for i, w in enumerate(checking):
            stamp = (stamps[2 * i], stamps[2 * i + 1])
            if (stamp != self.stamp.get(w)
                    or now - self.read_at.get(w, 0.0) >= RESYNC_S * self.pace):
                stale.append((w, stamp))
        await self._reread(conn, stale, now)
        self.done["reconciles"] += len(checking)

    async def _reread(self, conn: Conn, stale: list[tuple[str, tuple[object, object]]],
                      now: float) -> None:
        """What AssignmentReader.current() reads once the versions moved (or RESYNC_S)."""
        cmds: list[Command] = []
        for w, _ in stale:
            cmds += [(b"MULTI",), (b"HGETALL", self.k.assign(w).encode()),
                     (b"HKEYS", self.k.ledger(w).encode()), (b"EXEC",)]
        replies = await conn.run(cmds)
        models: list[Command] = []
        for i, (w, stamp) in enumerate(stale):
            execd = replies[4 * i + 3]
            flat = execd[0] if isinstance(execd, list) and isinstance(execd[0], list) else []
            for alias in flat[::2]:
                models += [(b"HGETALL", self.k.model(str(alias)).encode()),
                           (b"GET", self.k.hold(str(alias)).encode())]
            first = w not in self.read_at
            self.stamp[w] = stamp
            self.read_at[w] = now - (RESYNC_S * self.pace * (1 - self.phase[w]) if first else 0)
        await conn.run(models)


async def run(url: str, prefix: str, workers: int, duration_s: float, out: Path,
              first: int = 0) -> None:
    conn = await Conn.open(url)
    fleet = Fleet(Keys(prefix), [worker_id(first + i) for i in range(workers)])
    start = time.monotonic()
    stop_at = start + duration_s
    next_report = start + 1.0
    try:
        while time.monotonic() < stop_at:
            began = time.monotonic()
            await fleet.tick(conn)
            if began >= next_report:
                elapsed = began - start
                out.write_text(json.dumps({  # noqa: ASYNC240 - a few hundred bytes a second
                    "elapsed_s": elapsed, "heartbeats": fleet.done["heartbeats"],
                    "heartbeats_due": workers * elapsed / (HEARTBEAT_S * fleet.pace),
                    "reconciles": fleet.done["reconciles"],
                    "reconciles_due": workers * elapsed / (HINTED_POLL_S * fleet.pace),
                    "errors": 0, "last_error": None}))
                next_report += 1.0
            await asyncio.sleep(max(0.0, TICK_S - (time.monotonic() - began)))
    finally:
        conn.writer.close()


def main() -> None:
    cli(__doc__ or "", run)


if __name__ == "__main__":
    main()
