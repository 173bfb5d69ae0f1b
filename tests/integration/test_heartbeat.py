"""A real worker's heartbeats: while nothing it reports changes, a beat refreshes its alive
key alone (the record and its worker:revs count stay); a change (an engine started: its
load) is written at the next beat and moves the count. A lapsed beat racing the collector
leaves no partial record."""

from __future__ import annotations

import asyncio
import uuid
from typing import Any

import pytest
import redis
import redis.asyncio as aioredis

from shared.keys import Keys
from shared.models import Heartbeat, WorkerRegistration
from shared.store import Store, connect
from tests.support import Cluster, RedisServer, register, running_on, wait_until


def test_an_idle_worker_beats_without_rewriting_its_record(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1", HEARTBEAT_INTERVAL_S="0.2")
    router = cluster.router()
    k = Keys(cluster.prefix)
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        def beat() -> float:
            value = r.get(k.worker_alive("w1"))
            return float(value) if value else 0.0

        # Registration, the first full beat, and whatever the worker reports once at start
        # (its weights scan): settled once the count holds over a few beats.
        seen: list[tuple[str | None, float]] = []

        def settled() -> bool:
            rev = r.hget(k.worker_revs, "w1")
            seen.append((None if rev is None else str(rev), beat()))
            return (len(seen) >= 4 and seen[-1][0] is not None
                    and len({rev for rev, _ in seen[-4:]}) == 1
                    and len({t for _, t in seen[-4:]}) == 4)

        wait_until(settled, 30, interval=0.25, what="the worker's record settles")
        rev, record = seen[-1][0], r.hgetall(k.worker("w1"))
        first = beat()
        wait_until(lambda: beat() > first + 0.5, 10, what="three more beats")
        assert r.hget(k.worker_revs, "w1") == rev
        assert r.hgetall(k.worker("w1")) == record
        # An engine starts: its load is reported at the next beat, with the count.
        assert register(router, "m", engine="sim").status_code == 201
        wait_until(lambda: running_on(router, "m") == ["w1"], 30, what="m runs on w1")
        wait_until(lambda: r.hget(k.worker_revs, "w1") != rev, 10, what="the count moves")
        assert r.hget(k.worker("w1"), "load") == '{"instances": 1.0}'
    finally:
        r.close()


def test_a_record_collected_during_a_lapsed_beat_is_not_half_rewritten(
        redis_server: RedisServer, monkeypatch: pytest.MonkeyPatch) -> None:
    """A beat whose alive key had lapsed checks the record, then writes it. A collector that
    deletes the record in between (its alive key is absent, so it may) must not leave the
    beat's fields alone in a new record, with no URL, that no registration repairs: the beat
    answers None (register again) and writes nothing."""

    async def run() -> None:
        k = Keys(f"hb-{uuid.uuid4().hex[:8]}")
        store = Store(connect(redis_server.url), k)
        other = aioredis.Redis.from_url(redis_server.url)
        exists = aioredis.Redis.exists
        collected: list[int] = []

        async def exists_then_collect(self: Any, *names: Any) -> Any:
            found = await exists(self, *names)
            if not collected:  # the collector runs once, right after the check
                collected.append(await other.delete(k.worker("w1")))
            return found

        try:
            await store.register_worker(WorkerRegistration(
                worker_id="w1", url="http://w1:7000", engines=["sim"], gpu_message="x",
                version="t"), 30)
            await store.r.delete(k.worker_alive("w1"))  # the heartbeat lapsed
            monkeypatch.setattr(aioredis.Redis, "exists", exists_then_collect)
            assert await store.heartbeat("w1", Heartbeat(load={"instances": 1.0}), 30) is None
            assert collected == [1]
            assert await store.r.exists(k.worker("w1"), k.worker_alive("w1")) == 0
        finally:
            await other.aclose()
            await store.close()

    asyncio.run(run())
