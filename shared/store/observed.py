"""Observed state written by workers (instances, routes) and what routers read.

Every route change runs in one transaction that INCRs the routes version *and* appends the
alias to the capped routes log, so the version moves by exactly the number of log entries
written. A router that finds as many new entries as the version moved re-reads only those
aliases; anything else (entries trimmed away, a writer that bumps the version without an
entry, a Redis that lost data) and it reloads every alias, as it did before the log existed.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio.client import Pipeline

from shared.store.base import StoreBase

# Approximate cap of the routes log (Redis trims whole nodes, so it keeps at least this many).
# It only has to cover the route changes between two passes of a router (about a second);
# a router that fell further behind reloads everything.
ROUTES_LOG_MAXLEN = 5000


@dataclass(frozen=True)
class RouteChanges:
    """One consistent read of the version counters and the routes log (one MULTI/EXEC)."""

    versions: tuple[str, str]
    last_id: str
    """The newest entry of the log now ("0-0" when it is empty): where the next read starts."""
    aliases: list[str] | None
    """The alias of each entry after the ``after`` id asked for, oldest first, at most
    ``limit + 1`` of them; None when none were asked for or an entry has no alias."""


class ObservedStore(StoreBase):
    async def put_instance(self, alias: str, worker_id: str, fields: dict[str, str]) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.instance(alias, worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.instances(alias), worker_id)
            await pipe.execute()

    async def write_instance(self, alias: str, worker_id: str, fields: dict[str, str],
                             url: str | None) -> None:
        """An instance's record and its route (``url``: published; None: withdrawn) in one
        transaction, so no reader sees a record and a route that disagree (a FAILED record
        with a live route). Used by the worker's instance state machine only."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.instance(alias, worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.instances(alias), worker_id)
            if url is None:
                pipe.hdel(self.k.routes(alias), worker_id)
                pipe.hdel(self.k.load(alias), worker_id)
            else:
                pipe.hset(self.k.routes(alias), worker_id, url)
            self._route_changed(pipe, alias)
            await pipe.execute()
        await self.publish("route", alias=alias, worker=worker_id)

    async def delete_instance(self, alias: str, worker_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.k.instance(alias, worker_id))
            pipe.srem(self.k.instances(alias), worker_id)
            pipe.hdel(self.k.routes(alias), worker_id)
            pipe.hdel(self.k.load(alias), worker_id)
            self._route_changed(pipe, alias)
            await pipe.execute()
        await self.publish("route", alias=alias, worker=worker_id)

    async def instances_of(self, alias: str) -> dict[str, dict[str, str]]:
        ids = await self._members(self.k.instances(alias))
        raws = await self._hashes([self.k.instance(alias, w) for w in ids])
        return {w: raw for w, raw in zip(ids, raws, strict=True) if raw}

    async def set_route(self, alias: str, worker_id: str, url: str | None) -> None:
        """Publish (url) or withdraw (None) this worker's route for ``alias``."""
        async with self.r.pipeline(transaction=True) as pipe:
            if url is None:
                pipe.hdel(self.k.routes(alias), worker_id)
            else:
                pipe.hset(self.k.routes(alias), worker_id, url)
            self._route_changed(pipe, alias)
            await pipe.execute()
        await self.publish("route", alias=alias, worker=worker_id)

    def _route_changed(self, pipe: Pipeline, alias: str) -> None:
        """Inside a route-changing transaction: bump the routes version by one and log the
        alias with it (always both: routers count entries against the version's move)."""
        pipe.incr(self.k.routes_version)
        pipe.xadd(self.k.routes_log, {"alias": alias}, maxlen=ROUTES_LOG_MAXLEN,
                  approximate=True)

    # ------------------------------------------------------------------ router reads
    async def versions(self) -> tuple[str, str]:
        m, r = await self.r.mget([self.k.models_version, self.k.routes_version])
        return (str(m or "0"), str(r or "0"))

    async def route_changes(self, after: str | None, limit: int) -> RouteChanges:
        """The versions, the log's newest id and the aliases logged after ``after`` (an id an
        earlier call returned; None: only the versions and the newest id), read atomically."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.mget([self.k.models_version, self.k.routes_version])
            pipe.xrevrange(self.k.routes_log, "+", "-", count=1)
            if after is not None:
                pipe.xrange(self.k.routes_log, f"({after}", "+", count=limit + 1)
            replies = await pipe.execute()
        m, r = replies[0]
        newest = replies[1]
        aliases: list[str] | None = None
        if after is not None:
            aliases = []
            for _, fields in replies[2]:
                alias = fields.get("alias")
                if not alias:
                    aliases = None
                    break
                aliases.append(str(alias))
        return RouteChanges(versions=(str(m or "0"), str(r or "0")),
                            last_id=str(newest[0][0]) if newest else "0-0", aliases=aliases)

    async def all_routes(self, aliases: Iterable[str]) -> dict[str, dict[str, str]]:
        names = list(aliases)
        raws = await self._hashes([self.k.routes(a) for a in names])
        return dict(zip(names, raws, strict=True))

    async def loads(self, aliases: list[str]) -> dict[str, dict[str, float]]:
        raws = await self._hashes([self.k.load(a) for a in aliases])
        return {a: {w: float(v) for w, v in raw.items()}
                for a, raw in zip(aliases, raws, strict=True)}

    async def set_load(self, alias: str, worker_id: str, load: float | None) -> None:
        if load is None:
            await self.r.hdel(self.k.load(alias), worker_id)
        else:
            await self.r.hset(self.k.load(alias), worker_id, f"{load:g}")

    async def instances_by_alias(self, aliases: list[str]) -> dict[str, dict[str, dict[str, str]]]:
        """alias -> worker -> instance record, for many aliases in two round trips."""
        async with self.r.pipeline(transaction=False) as pipe:
            for a in aliases:
                pipe.smembers(self.k.instances(a))
            members = await pipe.execute()
        pairs = [(a, w) for a, ws in zip(aliases, members, strict=True) for w in sorted(ws)]
        raws = await self._hashes([self.k.instance(a, w) for a, w in pairs])
        out: dict[str, dict[str, dict[str, str]]] = {a: {} for a in aliases}
        for (a, w), raw in zip(pairs, raws, strict=True):
            if raw:
                out[a][w] = raw
        return out
