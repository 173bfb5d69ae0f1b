"""Store foundations: the client, the named errors, and what every part of the store shares.

Only the ``shared.store`` package talks to Redis. Every multi-key change is one MULTI/EXEC
transaction. Writes that only the scheduling leader may make are *fenced*: they WATCH the lease
key and run only while it still holds this manager's ``holder|epoch`` token, so a manager that
lost its lease cannot place anything. Keys are named in :mod:`shared.keys`; docs/redis.md
explains them.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.retry import Retry
from redis.asyncio.sentinel import Sentinel
from redis.backoff import ExponentialBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from redis.exceptions import WatchError

from shared.keys import Keys
from shared.models import ModelSpec


class NotLeader(Exception):
    """A fenced write was refused: the lease is not (or no longer) held by this token."""


@dataclass(frozen=True)
class StoredModel:
    spec: ModelSpec
    version: str
    created_at: float
    hold: str | None = None


def spec_fingerprint(spec: ModelSpec) -> str:
    return hashlib.sha256(orjson.dumps(spec.model_dump(), option=orjson.OPT_SORT_KEYS)).hexdigest()


_TIMEOUTS: dict[str, Any] = {"socket_connect_timeout": 2.0, "socket_timeout": 5.0}
_MAX_CONNECTIONS = 128
# A pooled connection broken by a Redis restart fails once; retrying on a fresh connection
# turns that into a short delay instead of an error (a real outage still fails fast).
_RETRY: dict[str, Any] = {
    "retry": Retry(ExponentialBackoff(cap=0.2, base=0.02), 2),
    "retry_on_error": [RedisConnectionError, RedisTimeoutError],
}


def connect(url: str, sentinels: str | None = None, master: str = "mymaster") -> aioredis.Redis:
    """A pooled client; short timeouts so a dead Redis gives a quick, clear error.

    With ``sentinels`` ("host:port,host:port"), the client asks Redis Sentinel for the current
    primary of ``master`` and asks again after a connection fails, so a promoted replica is
    found without restarting anything.
    """
    if not sentinels:
        # A blocking pool: a burst (hundreds of held requests) waits for a connection instead
        # of failing with "too many connections".
        pool = aioredis.BlockingConnectionPool.from_url(
            url, decode_responses=True, max_connections=_MAX_CONNECTIONS, timeout=10,
            **_TIMEOUTS, **_RETRY)
        return aioredis.Redis(connection_pool=pool)
    addrs = []
    for item in sentinels.split(","):
        host, _, port = item.strip().rpartition(":")
        addrs.append((host or "127.0.0.1", int(port)))
    sentinel = Sentinel(addrs, sentinel_kwargs=_TIMEOUTS, decode_responses=True, **_TIMEOUTS)
    client = sentinel.master_for(master, decode_responses=True, **_TIMEOUTS, **_RETRY)
    return cast(aioredis.Redis, client)


class StoreBase:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events: bool = True) -> None:
        self.r = client
        self.k = keys
        self.events_enabled = events

    async def close(self) -> None:
        await self.r.aclose()

    async def _members(self, key: str) -> list[str]:
        return sorted(cast(set[str], await self.r.smembers(key)))

    async def _hashes(self, keys: list[str]) -> list[dict[str, str]]:
        """HGETALL of every key, in one round trip (empty dicts for missing keys)."""
        async with self.r.pipeline(transaction=False) as pipe:
            for key in keys:
                pipe.hgetall(key)
            return list(await pipe.execute())

    # ------------------------------------------------------------------ events (hints only)
    async def publish(self, kind: str, **fields: str) -> None:
        if self.events_enabled:
            await self.r.publish(self.k.events, orjson.dumps({"kind": kind, **fields}))

    async def _fenced(self, token: str, build: Callable[[Pipeline], None]) -> None:
        """Run ``build``'s commands atomically, only while ``token`` holds the lease."""
        async with self.r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.k.lease)
                if await pipe.get(self.k.lease) != token:
                    raise NotLeader(token)
                pipe.multi()
                build(pipe)
                await pipe.execute()
            except WatchError as e:
                raise NotLeader(token) from e

    async def listen(self, on_event: Callable[[dict[str, Any]], None]) -> None:
        """Call ``on_event`` for each hint on the events channel, until cancelled.

        Hints are at-most-once (a reconnecting subscriber misses some); callers also poll.
        """
        if not self.events_enabled:
            return
        pubsub = self.r.pubsub(ignore_subscribe_messages=True)
        try:
            await pubsub.subscribe(self.k.events)
            async for msg in pubsub.listen():
                if msg.get("type") == "message":
                    on_event(orjson.loads(msg["data"]))
        finally:
            await pubsub.aclose()
