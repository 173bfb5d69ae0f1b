"""Leases of the limiter against a real redis-server: several limiters (routers) on one
key hold its limit (admitted <= burst + rate x (time + LIMITS_LEASE_S)) while a busy key
costs far fewer Redis calls than requests, and a slow key takes no lease."""

from __future__ import annotations

import asyncio
import time
import uuid

import pytest
import redis.asyncio as aioredis

from services.router.keyring import KeyRing
from services.router.limiter import Limiter
from shared.apikeys import KeyRecord
from shared.errors import RateLimited
from shared.events import Nudger
from shared.keys import Keys
from shared.settings import RouterSettings
from shared.store import Store
from tests.support import RedisServer


def limiters(url: str, n: int, lease_s: float) -> list[Limiter]:
    prefix = Keys(f"l{uuid.uuid4().hex[:8]}")
    out = []
    for i in range(n):
        store = Store(aioredis.Redis.from_url(url, decode_responses=True), prefix)
        settings = RouterSettings(router_id=f"r{i}", limits_lease_s=lease_s)
        ring = KeyRing(store, Nudger(store), settings)
        ring.routers = n
        out.append(Limiter(store, ring, settings))
    return out


async def hammer(lims: list[Limiter], rec: KeyRecord, seconds: float, clients: int = 16
                 ) -> tuple[int, int, float]:
    admitted = refused = 0

    async def client(i: int, until: float) -> None:
        nonlocal admitted, refused
        lim = lims[i % len(lims)]
        while time.monotonic() < until:
            try:
                ticket = await lim.admit(rec, "m", 10)
            except RateLimited:
                refused += 1
                await asyncio.sleep(0.001)
                continue
            admitted += 1
            lim.finish(ticket, used=None)
            await asyncio.sleep(0)

    began = time.monotonic()
    await asyncio.gather(*(client(i, began + seconds) for i in range(clients)))
    return admitted, refused, time.monotonic() - began


def test_leases_hold_the_limit_across_routers(redis_server: RedisServer) -> None:
    async def go() -> None:
        lims = limiters(redis_server.url, 4, 0.05)
        rec = KeyRecord("k1", "n", "t", "h", ["*"], rpm=12_000)  # 200/s, burst 200
        admitted, refused, elapsed = await hammer(lims, rec, 1.5)
        assert refused > 0  # the key was saturated
        assert all(lim._leases["k1"].want > 1 for lim in lims)  # and leased
        assert admitted <= 200 + 200 * (elapsed + 0.05) + 1, (admitted, elapsed)
        # Not under-admitted beyond the units one lease per router can leave unspent.
        assert admitted >= 200 + 200 * elapsed - 4 * 10, (admitted, elapsed)
        for lim in lims:
            await lim.store.close()

    asyncio.run(go())


def test_busy_key_costs_one_call_per_lease_and_slow_key_none(redis_server: RedisServer
                                                            ) -> None:
    async def go() -> None:
        (busy,) = limiters(redis_server.url, 1, 0.05)
        rec = KeyRecord("k2", "n", "t", "h", ["*"], rpm=60_000_000, tpm=6_000_000_000)
        for _ in range(500):
            busy.finish(await busy.admit(rec, "m", 10), used=None)
        assert busy.round_trips < 500 / 8, busy.round_trips
        (plain,) = limiters(redis_server.url, 1, 0.0)  # LIMITS_LEASE_S=0: one per request
        for _ in range(50):
            plain.finish(await plain.admit(rec, "m", 10), used=None)
        assert plain.round_trips == 50
        # 20 req/s: one lease time holds a single request, so no lease is taken.
        (slow,) = limiters(redis_server.url, 1, 0.05)
        slow_rec = KeyRecord("k3", "n", "t", "h", ["*"], rpm=1200)
        for _ in range(10):
            slow.finish(await slow.admit(slow_rec, "m", 10), used=None)
        assert slow.round_trips == 10
        for lim in (busy, plain, slow):
            await lim.store.close()

    asyncio.run(go())


def test_model_limits_of_a_key_share_one_call(redis_server: RedisServer) -> None:
    async def go() -> None:
        lim, other = limiters(redis_server.url, 2, 0.05)
        rec = KeyRecord("k4", "n", "t", "h", ["*"], rpm=600,
                        model_limits={"m*": {"rpm": 60}, "big": {"tpm": 6000}})
        first = await lim.admit(rec, "m1", 10)
        assert first.headers["x-ratelimit-limit-requests"] == "60"  # the model's, last
        with pytest.raises(RateLimited):
            await other.admit(rec, "m1", 10)  # one a second, across routers
        with pytest.raises(RateLimited):
            await lim.admit(rec, "m2", 10)  # the glob's bucket is shared by its models
        # Another model: only the key's own limit (burst 10).
        assert [(await other.admit(rec, "x", 10)).headers["x-ratelimit-limit-requests"]
                for _ in range(3)] == ["600"] * 3
        big = await lim.admit(rec, "big", 5000)  # idle: one request may exceed the burst
        assert big.headers["x-ratelimit-limit-tokens"] == "6000"
        with pytest.raises(RateLimited) as caught:
            await other.admit(rec, "big", 10)
        assert caught.value.headers["x-ratelimit-remaining-tokens"] == "0"
        assert lim.round_trips + other.round_trips == 8  # one call per request, no more
        for x in (lim, other):
            await x.store.close()

    asyncio.run(go())


def test_max_concurrent_holds_for_requests_that_arrive_together(
        redis_server: RedisServer) -> None:
    """Requests of one key that arrive at once all wait for the same Redis call: each takes
    its slot before that wait, so no more than max_concurrent are admitted."""
    async def go() -> None:
        (lim,) = limiters(redis_server.url, 1, 0.0)
        rec = KeyRecord(key_id="k1", name="k", tenant="t", secret_hash="", models=["*"],
                        rpm=600_000, max_concurrent=2)
        results = await asyncio.gather(*(lim.admit(rec, "m", 10) for _ in range(20)),
                                       return_exceptions=True)
        tickets = [r for r in results if not isinstance(r, BaseException)]
        assert len(tickets) == 2
        assert all(isinstance(r, RateLimited) for r in results if r not in tickets)
        for t in tickets:
            lim.finish(t, used=None)
        assert lim.concurrent == {}  # every slot given back, the refused ones' too
        (await lim.admit(rec, "m", 10)).done = True  # a slot is free again

    asyncio.run(go())
