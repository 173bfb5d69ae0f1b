"""Serverless lifecycle: demand for cold models, the cluster-wide hold queue, timings."""

from __future__ import annotations

import statistics
import time
from typing import Any

from redis.asyncio.client import Pipeline

from shared.records import BadRecord, parse_samples, parse_timings
from shared.store.base import StoreBase

# Admits one held request unless the alias's queue is full; expired entries (a router that
# died with requests waiting) are dropped first. Scores are expiry times from Redis's clock.
_ENTER_QUEUE_LUA = """
local t = redis.call('TIME')
local now = tonumber(t[1]) + tonumber(t[2]) / 1000000
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now)
if redis.call('ZCARD', KEYS[1]) >= tonumber(ARGV[3]) then return 0 end
redis.call('ZADD', KEYS[1], now + tonumber(ARGV[2]), ARGV[1])
redis.call('PEXPIRE', KEYS[1], math.ceil(tonumber(ARGV[2]) * 1000) + 1000)
return 1
"""

SAMPLES_KEPT = 50
TIMING_KINDS = ("cold_start", "wake")


class LifecycleStore(StoreBase):
    # ------------------------------------------------------------------ demand
    async def want(self, alias: str, ttl_s: float) -> None:
        """Record that a request waits for ``alias``; the scheduler wakes or places it."""
        def build(pipe: Pipeline) -> None:
            pipe.set(self.k.demand(alias), repr(time.time()), px=max(1, int(ttl_s * 1000)))

        # Logged for the scheduler's tick (the hint alone may be lost).
        await self._commit(self.k.demand(alias), build, [self._intent_changed(alias)])
        await self.publish("demand", alias=alias)

    async def clear_demand(self, alias: str) -> None:
        await self.r.delete(self.k.demand(alias))

    async def demands(self, aliases: list[str]) -> set[str]:
        if not aliases:
            return set()
        vals = await self._mget([self.k.demand(a) for a in aliases])
        return {a for a, v in zip(aliases, vals, strict=True) if v is not None}

    # ------------------------------------------------------------------ hold queue
    async def enter_queue(self, alias: str, member: str, ttl_s: float, max_len: int) -> bool:
        """Admit a held request; False when ``max_len`` requests already wait cluster-wide."""
        ok = await self.r.eval(_ENTER_QUEUE_LUA, 1, self.k.queue(alias), member, ttl_s, max_len)
        return bool(ok)

    async def leave_queue(self, alias: str, member: str) -> None:
        await self.r.zrem(self.k.queue(alias), member)

    async def queue_length(self, alias: str) -> int:
        return int(await self.r.zcard(self.k.queue(alias)))

    # ------------------------------------------------------------------ timings
    async def record_duration(self, alias: str, kind: str, seconds: float) -> None:
        async with self._txn(self.k.stats(alias)) as pipe:
            pipe.hincrby(self.k.stats(alias), f"{kind}s", 1)
            pipe.hset(self.k.stats(alias), f"last_{kind}_s", f"{seconds:.4f}")
            pipe.lpush(self.k.samples(alias, kind), f"{seconds:.4f}")
            pipe.ltrim(self.k.samples(alias, kind), 0, SAMPLES_KEPT - 1)
            await pipe.execute()

    async def record_wait(self, alias: str, seconds: float) -> None:
        async with self._txn(self.k.stats(alias)) as pipe:
            pipe.hincrby(self.k.stats(alias), "waited_requests", 1)
            pipe.hincrbyfloat(self.k.stats(alias), "wait_total_s", seconds)
            await pipe.execute()

    async def timings(self, alias: str) -> dict[str, Any]:
        """Counts, last and median durations of cold starts and wakes, and request waits."""
        async with self._batch() as pipe:
            pipe.hgetall(self.k.stats(alias))
            for kind in TIMING_KINDS:
                pipe.lrange(self.k.samples(alias, kind), 0, -1)
            raw, *samples = await pipe.execute()
        return self._timings(alias, raw, samples)

    def _timings(self, alias: str, raw: dict[str, str], samples: list[list[str]]
                 ) -> dict[str, Any]:
        """What :meth:`timings` returns, from its reads; bad stats read as none recorded."""
        try:
            stats = parse_timings(self.k.stats(alias), raw)
        except BadRecord as e:
            self._skip(e)
            stats = {}
        out: dict[str, Any] = {}
        for kind, values in zip(TIMING_KINDS, samples, strict=True):
            try:
                nums = parse_samples(self.k.samples(alias, kind), values)
            except BadRecord as e:
                self._skip(e)
                nums = []
            out[f"{kind}s"] = int(stats.get(f"{kind}s", 0))
            out[f"last_{kind}_s"] = stats.get(f"last_{kind}_s")
            out[f"median_{kind}_s"] = statistics.median(nums) if nums else None
        out["waited_requests"] = int(stats.get("waited_requests", 0))
        out["wait_total_s"] = round(stats.get("wait_total_s", 0.0), 4)
        return out
