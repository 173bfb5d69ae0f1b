"""Redis Cluster plumbing of the store: which primary serves a key, and transactions and
pipelines over plain connections to it.

redis-py's cluster client finds the nodes and serves single commands. Its cluster
transactions start a thread per queued command (about a millisecond each), and its cluster
pipeline works out each command's slot through its command table (tens of microseconds each):
together they made a scheduler pass about twice as slow as on one Redis. Every transaction of
the store keeps to one slot, so it can run on a plain connection to that slot's primary; a
batch of reads becomes one plain pipeline per primary, sent together.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Callable
from typing import Any

import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.asyncio.cluster import RedisCluster
from redis.crc import key_slot
from redis.exceptions import AskError, MovedError
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError

# Answers after which the slot map is read again (a slot moved, a primary failed over): the
# plain connections follow the new map from the next call, which the callers' loops make.
RELEARN = (MovedError, AskError, RedisConnectionError, RedisTimeoutError)


class Primaries:
    """A plain client per primary of ``cluster``, and which one serves each slot (learnt
    as used; forgotten when the map is read again)."""

    def __init__(self, cluster: RedisCluster, client_kwargs: dict[str, Any]) -> None:
        self.cluster = cluster
        self._kwargs = client_kwargs
        self._clients: dict[str, aioredis.Redis] = {}
        self._slots: dict[int, aioredis.Redis] = {}

    async def ready(self) -> None:
        """Make sure the slot map has been read (the cluster client does at its first use)."""
        await self.cluster.initialize()

    async def relearn(self) -> None:
        self._slots.clear()
        await self.cluster.nodes_manager.initialize()

    def of(self, key: str) -> aioredis.Redis:
        """After :meth:`ready`: the client of the primary serving ``key``'s slot."""
        slot = key_slot(key.encode())
        client = self._slots.get(slot)
        if client is not None:
            return client
        node = self.cluster.nodes_manager.get_node_from_slot(slot)
        client = self._clients.get(node.name)
        if client is None:
            client = aioredis.Redis(host=node.host, port=int(node.port), **self._kwargs)
            self._clients[node.name] = client
        self._slots[slot] = client
        return client

    @contextlib.asynccontextmanager
    async def txn(self, key: str) -> AsyncIterator[Pipeline]:
        """MULTI/EXEC (and WATCH) on the primary of ``key``'s slot. A moved slot or a lost
        connection reads the map again and fails this call once."""
        await self.ready()
        try:
            async with self.of(key).pipeline(transaction=True) as pipe:
                yield pipe
        except RELEARN:
            await self.relearn()
            raise

    async def close(self) -> None:
        for client in self._clients.values():
            await client.aclose()


class Scatter:
    """A non-transactional pipeline over the cluster: commands are queued, then sent as one
    plain pipeline per primary, all at once, and the replies put back in order. A command's
    key is its first argument (for EVAL and EVALSHA, its first declared key): every command
    the store queues has one."""

    def __init__(self, primaries: Primaries) -> None:
        self._primaries = primaries
        self._queued: list[tuple[str, tuple[Any, ...], dict[str, Any]]] = []

    def __getattr__(self, name: str) -> Callable[..., None]:
        queued = self._queued

        def queue(*args: Any, **kwargs: Any) -> None:
            queued.append((name, args, kwargs))
        return queue

    async def execute(self, raise_on_error: bool = True) -> list[Any]:
        await self._primaries.ready()
        by_node: dict[aioredis.Redis, list[int]] = {}
        for i, (name, args, _) in enumerate(self._queued):
            key = args[2] if name in ("eval", "evalsha") else args[0]
            by_node.setdefault(self._primaries.of(str(key)), []).append(i)

        async def run(client: aioredis.Redis, idx: list[int]) -> list[Any]:
            async with client.pipeline(transaction=False) as pipe:
                for i in idx:
                    name, args, kwargs = self._queued[i]
                    getattr(pipe, name)(*args, **kwargs)
                return await pipe.execute(raise_on_error=raise_on_error)

        try:
            replies = await asyncio.gather(*(run(c, idx) for c, idx in by_node.items()))
        except RELEARN:
            await self._primaries.relearn()
            raise
        out: list[Any] = [None] * len(self._queued)
        for idx, values in zip(by_node.values(), replies, strict=True):
            for i, v in zip(idx, values, strict=True):
                if isinstance(v, (MovedError, AskError)):
                    # A slot that moved (resharding) is no bad record: learn the new map and
                    # fail this read once, as the cluster client would have retried it.
                    await self._primaries.relearn()
                    raise v
                out[i] = v
        return out
