"""The limiter's GCRA script against a real redis-server (fakeredis's Lua is not exact):
bursts, spacing, all-or-nothing over buckets, token debt and corrections."""

from __future__ import annotations

import asyncio
import math
import time
import uuid

import pytest
import redis.asyncio as aioredis

from services.router.limiter import Bucket, _req_bucket, _tok_bucket
from shared.keys import Keys
from shared.store import Decision, FlushBatch, Store
from tests.support import RedisServer


@pytest.fixture
def store(redis_server: RedisServer) -> Store:
    client = aioredis.Redis.from_url(redis_server.url, decode_responses=True)
    return Store(client, Keys(f"u{uuid.uuid4().hex[:8]}"))


def args(buckets: list[Bucket], costs: list[int]) -> list[float]:
    out: list[float] = []
    for b, c in zip(buckets, costs, strict=True):
        out += [b.interval_us, b.tau_us, c]
    return out


_SEQ = iter(range(1, 1 << 30))


async def correct(store: Store, key: str, delta_us: float) -> None:
    """A router's flush of one correction (tenant "t", a fresh batch each time, the one
    before it confirmed: the numbering runs across the tests of a process)."""
    seq = next(_SEQ)
    await store.flush("writer", [FlushBatch("t", seq, {key: delta_us}, {})], {"t": seq - 1})


async def decide(store: Store, buckets: list[Bucket], costs: list[int]) -> Decision:
    return await store.limit([b.key for b in buckets], args(buckets, costs))


def test_burst_then_spacing(store: Store) -> None:
    async def go() -> None:
        b = _req_bucket(store.k.rate("t", "k", "req"), 600)  # 10/s, burst 10, one per 100 ms
        got = [(await decide(store, [b], [1])).admitted for _ in range(12)]
        assert got == [True] * 10 + [False] * 2
        refused = await decide(store, [b], [1])
        assert 0 < refused.retry_us <= 100_000
        await asyncio.sleep(refused.retry_us / 1e6 + 0.01)
        assert (await decide(store, [b], [1])).admitted
        assert not (await decide(store, [b], [1])).admitted
        await store.close()

    asyncio.run(go())


def test_admitted_over_time_is_rate_times_time_plus_burst(store: Store) -> None:
    async def go() -> None:
        b = _req_bucket(store.k.rate("t", "k", "req"), 1200)  # 20/s, burst 20
        began = time.monotonic()
        admitted = 0
        while time.monotonic() - began < 1.5:
            admitted += (await decide(store, [b], [1])).admitted
        elapsed = time.monotonic() - began
        assert 20 + 20 * elapsed - 2 <= admitted <= 20 + 20 * elapsed + 1
        await store.close()

    asyncio.run(go())


def test_all_or_nothing_across_buckets(store: Store) -> None:
    async def go() -> None:
        key = _req_bucket(store.k.rate("t", "k", "req"), 6000)  # plenty
        tenant = _req_bucket(store.k.rate("t", "tenant", "req"), 60)  # burst 1
        assert (await decide(store, [key, tenant], [1, 1])).admitted
        before = await store.r.get(key.key)
        refused = await decide(store, [key, tenant], [1, 1])
        assert not refused.admitted
        assert await store.r.get(key.key) == before  # the refusal charged nothing
        await store.close()

    asyncio.run(go())


def test_tokens_admit_one_large_request_then_wait_out_its_debt(store: Store) -> None:
    async def go() -> None:
        tok = _tok_bucket(store.k.rate("t", "k", "tok"), 6000)  # 100/s, 1 s outstanding
        big = await decide(store, [tok], [500])  # larger than the burst: admitted when idle
        assert big.admitted and big.ahead_us[0] == pytest.approx(5_000_000, abs=20_000)
        refused = await decide(store, [tok], [1])
        assert not refused.admitted
        assert refused.retry_us == pytest.approx(4_000_000, abs=20_000)
        # The answer used 50 tokens: the correction gives back 450 tokens' worth.
        await correct(store, tok.key, -450 * tok.interval_us)
        assert (await decide(store, [tok], [1])).admitted
        await store.close()

    asyncio.run(go())


def test_a_debt_outlives_its_reservation_and_a_late_refund_leaves_no_key(store: Store
                                                                         ) -> None:
    """A correction moves the bucket's expiry with its TAT: an answer that used far more
    than its reservation keeps the key refused for the whole debt (it vanished with the
    reservation's expiry), also when the key had already expired; a refund on an idle bucket
    leaves no key behind (it left one without an expiry)."""
    async def go() -> None:
        tok = _tok_bucket(store.k.rate("t", "k", "tok"), 6000)  # 100/s, 1 s outstanding
        assert (await decide(store, [tok], [50])).admitted  # 0.5 s ahead
        # The answer used 250,000 more tokens than reserved: 2,500 s of debt.
        await correct(store, tok.key, 250_000 * tok.interval_us)
        ttl_ms = await store.r.pttl(tok.key)
        assert ttl_ms > 2_500_000  # kept for the whole debt, not the reservation's 60.5 s
        assert not (await decide(store, [tok], [1])).admitted
        # A debt on a key that had expired (the bucket idle) starts from now.
        await store.r.delete(tok.key)
        await correct(store, tok.key, 500 * tok.interval_us)
        refused = await decide(store, [tok], [1])
        assert not refused.admitted and refused.retry_us == pytest.approx(4_000_000, abs=50_000)
        # A refund on an idle bucket: no key is left (nothing to give back).
        idle = _tok_bucket(store.k.rate("t", "k2", "tok"), 6000)
        await correct(store, idle.key, -400 * idle.interval_us)
        assert await store.r.exists(idle.key) == 0
        await store.close()

    asyncio.run(go())


def test_script_reloaded_after_script_flush(store: Store) -> None:
    async def go() -> None:
        b = _req_bucket(store.k.rate("t", "k2", "req"), 60)
        assert (await decide(store, [b], [1])).admitted
        await store.r.script_flush()
        assert not (await decide(store, [b], [1])).admitted  # NOSCRIPT -> loaded again
        await store.close()

    asyncio.run(go())


def test_decisions_together_in_one_pipeline(store: Store) -> None:
    async def go() -> None:
        b = _req_bucket(store.k.rate("t", "k3", "req"), 180)  # burst 3
        call = ([b.key], args([b], [1]))
        got = await store.limit_many([call] * 5)
        assert [d.admitted for d in got] == [True, True, True, False, False]
        await store.r.script_flush()
        other = _req_bucket(store.k.rate("t", "k4", "req"), 180)
        again = await store.limit_many([([other.key], args([other], [1]))] * 2)
        assert [d.admitted for d in again] == [True, True]  # reloaded, each decided once
        await store.close()

    asyncio.run(go())


def lease_args(buckets: list[Bucket], costs: list[int], requests: int, tokens: int
               ) -> list[float]:
    return [*args(buckets, costs), requests, tokens, *(2 if b.tokens else 1 for b in buckets)]


def test_lease_grants_what_every_bucket_still_admits(store: Store) -> None:
    async def go() -> None:
        req = _req_bucket(store.k.rate("t", "k5", "req"), 600)  # burst 10, 100 ms apart
        tok = _tok_bucket(store.k.rate("t", "k5", "tok"), 60_000)  # 1000 tokens outstanding
        keys = [req.key, tok.key]
        t0 = time.monotonic()
        first = await store.limit(keys, lease_args([req, tok], [1, 100], 4, 400))
        assert first.admitted and first.leased == (4, 400)
        # Charged for the request and its lease: 5 requests, 500 tokens.
        assert first.ahead_us[0] == pytest.approx(500_000, abs=5_000)
        assert first.ahead_us[1] == pytest.approx(500_000, abs=5_000)
        # Wants more than is left: 4 more requests fit the burst, 400 more tokens (+1: a
        # unit is checked before it is charged).
        second = await store.limit(keys, lease_args([req, tok], [1, 100], 50, 5000))
        # The buckets drain while the test runs (a loaded machine: milliseconds): what that
        # time gave back (1 token a ms, 1 request per 100 ms) may be granted on top.
        drift_ms = (time.monotonic() - t0) * 1000
        assert second.admitted
        assert 4 <= second.leased[0] <= 4 + math.ceil(drift_ms / 100)
        assert 401 <= second.leased[1] <= 401 + math.ceil(drift_ms)
        refused = await store.limit(keys, lease_args([req, tok], [1, 100], 4, 400))
        assert not refused.admitted and refused.leased == (0, 0)
        plain = await store.limit(keys, args([req, tok], [1, 100]))  # no lease asked
        assert not plain.admitted and plain.leased == (0, 0)
        await store.close()

    asyncio.run(go())
