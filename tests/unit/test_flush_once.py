"""A router's token corrections and usage counts reach Redis exactly once, also when the reply
to a flush is lost after Redis applied it (a timeout: redis-py retries it, and the router sends
what it could not confirm again). Against a real redis-server."""

from __future__ import annotations

import time
import uuid
from collections.abc import Mapping, Sequence
from typing import cast

import pytest
import redis.asyncio as aioredis
from redis.exceptions import ConnectionError as RedisConnectionError

from services.router.keyring import KeyRing
from services.router.limiter import Limiter, Ticket, _tok_bucket
from shared.apikeys import KeyRecord, hash_secret
from shared.events import Nudger
from shared.keys import Keys
from shared.settings import RouterSettings
from shared.store import FlushBatch, Store
from tests.support import RedisServer


class ReplyLost(Store):
    """The network's fault, not the store's: Redis applies a flush, and its reply is lost
    on the way back the first ``lose`` times."""

    lose = 0

    async def flush(self, writer: str, batches: Sequence[FlushBatch],
                    confirmed: Mapping[str, int] | None = None) -> list[bool]:
        done = await super().flush(writer, batches, confirmed)
        if self.lose:
            self.lose -= 1
            raise RedisConnectionError("reply lost")
        return done


@pytest.fixture
def store(redis_server: RedisServer) -> ReplyLost:
    return ReplyLost(aioredis.Redis.from_url(redis_server.url, decode_responses=True),
                     Keys(f"f{uuid.uuid4().hex[:8]}"))


async def usage(store: Store, tenant: str, hours: Sequence[int] = (0,)) -> dict[str, str]:
    """The usage hash of ``tenant`` summed over ``hours`` (a count that is not a number is
    given as it is)."""
    out: dict[str, str] = {}
    for h in set(hours):
        got = cast(dict[str, str], await store.r.hgetall(store.k.usage(tenant, h)))
        for f, v in got.items():
            both = f in out and out[f].isdigit() and v.isdigit()
            out[f] = str(int(out[f]) + int(v)) if both else v
    return out


async def tat(store: Store, key: str) -> float:
    raw = cast(str | None, await store.r.get(key))
    assert raw is not None
    return float(raw)


def this_hour() -> int:
    return int(time.time()) // 3600 * 3600


async def test_a_batch_sent_again_is_applied_once_and_in_order(store: ReplyLost) -> None:
    key = store.k.rate("acme", "k1", "tok")
    first = FlushBatch("acme", 1, {key: 3.6e9}, {0: {"k1|m|requests": 2}})  # an hour
    assert await store.flush("router-a", [first]) == [True]
    before = await tat(store, key)
    assert await store.flush("router-a", [first]) == [True]  # its reply was lost: again
    assert await usage(store, "acme") == {"k1|m|requests": "2"}
    assert await tat(store, key) == before
    # Batch 3 before batch 2 (which failed): refused, to be sent again after it.
    third = FlushBatch("acme", 3, {}, {0: {"k1|m|requests": 10}})
    assert await store.flush("router-a", [third]) == [False]
    second = FlushBatch("acme", 2, {}, {0: {"k1|m|requests": 1}})
    assert await store.flush("router-a", [second, third]) == [True, True]
    # Another router's batches are numbered on their own.
    assert await store.flush("router-b", [FlushBatch("acme", 1, {}, {0: {
        "k1|m|requests": 1}})]) == [True]
    assert await usage(store, "acme") == {"k1|m|requests": "14"}
    # A count that is not a number, and a bucket of the wrong type, are skipped and
    # reported; the rest of the batch lands (nothing half-applied).
    await store.r.hset(store.k.usage("acme", 0), "k1|m|errors", "many")
    bad_bucket = store.k.rate("acme", "k2", "tok")
    await store.r.lpush(bad_bucket, "x")
    fourth = FlushBatch("acme", 4, {bad_bucket: 1e6, key: 1e6},
                        {0: {"k1|m|errors": 1, "k1|m|requests": 1}})
    assert await store.flush("router-a", [fourth]) == [True]
    assert await usage(store, "acme") == {"k1|m|requests": "15", "k1|m|errors": "many"}
    assert await tat(store, key) == pytest.approx(before + 1e6, abs=1)
    assert store.k.flushed("acme", "router-a") in {p["key"] for p in store.problems.since(0)}
    # A Redis that lost the numbers (restarted without its data) takes the router's next
    # batch: the router says which it saw confirmed last.
    await store.r.delete(store.k.flushed("acme", "router-a"))
    assert await store.flush("router-a", [FlushBatch("acme", 5, {}, {0: {
        "k1|m|requests": 1}})], {"acme": 4}) == [True]
    assert (await usage(store, "acme"))["k1|m|requests"] == "16"
    await store.close()


async def test_a_flush_whose_reply_was_lost_is_counted_once(store: ReplyLost) -> None:
    settings = RouterSettings(router_id="r1")
    ring = KeyRing(store, Nudger(store), settings)
    limiter = Limiter(store, ring, settings)
    rec = KeyRecord("k1", "n", "acme", hash_secret(b"s"), ["*"], tpm=6000)
    bucket = _tok_bucket(store.k.rate("acme", "k1", "tok"), 6000)

    def answered(used: int) -> None:
        ticket = Ticket(rec, "m", 100, [bucket], {}, True)
        limiter.finish(ticket, used=used, prompt=used // 2, completion=used - used // 2)

    seconds, micros = await store.r.time()
    ahead = (seconds + 3600) * 1e6 + micros  # an hour ahead: every correction stays visible
    await store.r.set(bucket.key, f"{ahead:.1f}", px=7_200_000)
    first_hour = this_hour()
    answered(40)
    store.lose = 1
    with pytest.raises(RedisConnectionError):
        await limiter.flush()
    answered(60)  # arrives before the resend: waits for it, then goes in a batch of its own
    await limiter.flush()
    hours = (first_hour, this_hour())
    assert (await usage(store, "acme", hours))["k1|m|requests"] == "1"  # once, not twice
    await limiter.flush()
    assert await usage(store, "acme", hours) == {
        "k1|m|requests": "2", "k1|m|prompt_tokens": "50", "k1|m|completion_tokens": "50"}
    refunds = (100 - 40 + 100 - 60) * bucket.interval_us
    assert await tat(store, bucket.key) == pytest.approx(ahead - refunds, abs=1)
    await limiter.flush()  # nothing new: nothing sent, nothing counted again
    assert (await usage(store, "acme", hours))["k1|m|requests"] == "2"
    await store.close()


async def test_a_tenant_whose_batches_fail_holds_back_only_itself(store: ReplyLost) -> None:
    settings = RouterSettings(router_id="r1")
    limiter = Limiter(store, KeyRing(store, Nudger(store), settings), settings)

    def answered(tenant: str) -> None:
        rec = KeyRecord("k", "n", tenant, hash_secret(tenant.encode()), ["*"])
        limiter.finish(Ticket(rec, "m", 0, [], {}, True), used=3, prompt=1, completion=2)

    answered("acme")
    answered("beta")
    await limiter.flush()
    # acme's next batch is refused (as when an earlier one of it failed and was lost
    # track of: its slot keeps a number two behind); beta's lands all the same.
    await store.r.set(store.k.flushed("acme", limiter._writer), "1")
    limiter._seq["acme"] = 2
    for _ in range(2):
        answered("acme")
        answered("beta")
        await limiter.flush()
    hours = (this_hour() - 3600, this_hour())
    assert (await usage(store, "beta", hours))["k|m|requests"] == "3"
    assert (await usage(store, "acme", hours))["k|m|requests"] == "1"
    assert list(limiter._unconfirmed) == ["acme"]  # its one batch, kept; the rest waits
    assert len(limiter._unconfirmed["acme"]) == 1
    await store.r.set(store.k.flushed("acme", limiter._writer), "2")
    await limiter.flush_all()
    assert (await usage(store, "acme", hours))["k|m|requests"] == "3"
    assert not limiter._unconfirmed
    await store.close()


async def test_a_redis_that_lost_its_last_writes_does_not_hold_a_router_back(
        store: ReplyLost) -> None:
    # An append-only file loses its last second in a crash (appendfsync everysec), or a
    # failover promotes a replica a little behind: the kept number goes back below what the
    # router saw confirmed. Its next batches must still land, not wait a day for the TTL.
    settings = RouterSettings(router_id="r1")
    limiter = Limiter(store, KeyRing(store, Nudger(store), settings), settings)
    rec = KeyRecord("k", "n", "acme", hash_secret(b"acme"), ["*"])

    def answered() -> None:
        limiter.finish(Ticket(rec, "m", 0, [], {}, True), used=3, prompt=1, completion=2)

    for _ in range(3):
        answered()
        await limiter.flush()
    await store.r.set(store.k.flushed("acme", limiter._writer), "1")  # batches 2, 3 lost
    answered()
    await limiter.flush()
    assert not limiter._unconfirmed
    hours = (this_hour() - 3600, this_hour())
    assert (await usage(store, "acme", hours))["k|m|requests"] == "4"
    await store.close()
