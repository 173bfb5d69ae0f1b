"""What waiting costs a router, against a real redis-server (the real ``RouteTable`` and
``Holder``, in process): held requests of one alias share one waiter, so their Redis traffic
does not grow with their number; unknown models do not refresh per request while Redis is
down."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import redis

from services.router.hold import Holder
from services.router.routes import RouteTable
from shared.errors import NoCapacity
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec
from shared.settings import RouterSettings
from shared.store import Store, StoredModel, connect
from shared.store.observed import RouteChanges
from tests.support import RedisServer, free_port


@pytest.fixture
async def store(redis_server: RedisServer) -> AsyncIterator[Store]:
    s = Store(connect(redis_server.url), Keys(f"t{uuid.uuid4().hex[:10]}"), events=False)
    yield s
    await s.close()


def commands(url: str) -> int:
    r = redis.Redis.from_url(url)
    try:
        return int(r.info("stats")["total_commands_processed"])
    finally:
        r.close()


async def held(store: Store) -> tuple[Holder, StoredModel]:
    spec = ModelSpec(alias="cold", model_name="org/m", engine="sim", min_replicas=0)
    await store.register_model(spec)
    table = RouteTable(store, Nudger(store), 1.0)
    await table.refresh()
    model = table.models["cold"]
    return Holder(table, store, RouterSettings(router_id="r1", hold_queue_max=2000)), model


async def test_held_requests_of_one_alias_share_one_waiter(
        store: Store, redis_server: RedisServer) -> None:
    holder, model = await held(store)

    async def rate(n: int) -> float:
        tickets = [await holder.admit(model) for _ in range(n)]
        before, t0 = commands(redis_server.url), time.monotonic()
        assert not any(await asyncio.gather(*(t.wait(2.5) for t in tickets)))
        spent = (commands(redis_server.url) - before) / (time.monotonic() - t0)
        for t in tickets:
            await t.release()
        return spent

    ten = await rate(10)
    many = await rate(300)
    # Each request polled on its own: ~1.5 commands/s each, so 300 cost 30 times what 10 did.
    assert many <= max(ten * 1.5, 5.0), (ten, many)
    assert holder.waits == {}  # the shared waiter goes with the last request


async def test_one_verdict_fails_every_held_request(store: Store) -> None:
    holder, model = await held(store)
    tickets = [await holder.admit(model) for _ in range(20)]
    await store.set_placement_reason("cold", "no worker runs sim")
    outcomes = await asyncio.gather(*(t.wait(5.0) for t in tickets), return_exceptions=True)
    assert all(isinstance(o, NoCapacity) and "no worker runs sim" in o.message
               for o in outcomes), outcomes
    for t in tickets:
        await t.release()


async def test_unknown_model_does_not_wait_on_a_dead_redis(tmp_path: Path) -> None:
    server = RedisServer(free_port(), tmp_path / "redis").start()
    store = Store(connect(server.url), Keys("t"), events=False)
    refreshes = 0
    real = store.route_changes

    async def counted(*args: Any) -> RouteChanges:
        nonlocal refreshes
        refreshes += 1  # each refresh starts with this read
        return await real(*args)

    store.route_changes = counted  # type: ignore[method-assign,assignment]
    try:
        table = RouteTable(store, Nudger(store), 1.0)
        await table.refresh()
        # Up: concurrent misses share one refresh, and a new model is found by it.
        await store.register_model(ModelSpec(alias="late", model_name="org/m", engine="sim"))
        await asyncio.sleep(0.3)  # misses refresh at most every 0.2 s
        refreshes = 0
        found = await asyncio.gather(*(table.model("late") for _ in range(50)))
        assert all(m is not None for m in found) and refreshes == 1
        server.stop()
        t0 = time.monotonic()
        for i in range(40):
            assert await table.model(f"nope{i}") is None
            await asyncio.sleep(0.01)
        # Before: a refresh per request, each waiting out the Redis errors and retries.
        assert refreshes <= 2, refreshes
        assert time.monotonic() - t0 < 2.0
        assert table.models["late"].spec.alias == "late"  # still served from the cache
    finally:
        server.stop()
        await store.close()
