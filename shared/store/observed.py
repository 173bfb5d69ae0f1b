"""Observed state written by workers (instances, routes) and what routers read.

Every route change runs in one transaction that INCRs the routes version *and* appends the
alias to the capped routes log, so the version moves by exactly the number of log entries
written. A router that finds as many new entries as the version moved re-reads only those
aliases; anything else (entries trimmed away, a writer that bumps the version without an
entry, a Redis that lost data) and it reloads every alias, as it did before the log existed.
"""

from __future__ import annotations

import asyncio
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any, cast

from redis.asyncio.client import Pipeline

from shared.records import BadRecord, parse_instance, parse_load
from shared.store.base import ROUTES_LOG_MAXLEN, StoreBase

__all__ = ["ROUTES_LOG_MAXLEN", "ObservedStore", "RouteChanges"]


@dataclass(frozen=True)
class RouteChanges:
    """One consistent read of the version counters and the routes log (one MULTI/EXEC)."""

    versions: tuple[str, str]
    last_id: str
    """The newest entry of the log now ("0-0" when it is empty): where the next read starts."""
    aliases: list[str] | None
    """The alias of each entry after the ``after`` id asked for, oldest first, at most
    ``limit + 1`` of them; None when none were asked for or an entry has no alias."""
    models_last_id: str = "0-0"
    """The same for the models log (bumps of the models version)."""
    models: list[str] | None = None
    alive: set[str] = field(default_factory=set)
    """Those of the workers asked about whose heartbeat key exists."""


def _logged_aliases(entries: list[tuple[str, dict[str, str]]]) -> list[str] | None:
    aliases = []
    for _, fields in entries:
        alias = fields.get("alias")
        if not alias:
            return None
        aliases.append(str(alias))
    return aliases


def _newest(entries: list[tuple[str, dict[str, str]]]) -> str:
    return str(entries[0][0]) if entries else "0-0"


class ObservedStore(StoreBase):
    async def put_instance(self, alias: str, worker_id: str, fields: dict[str, str]) -> None:
        async with self._txn(self.k.instances(alias)) as pipe:
            pipe.hset(self.k.instance(alias, worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.instances(alias), worker_id)
            await pipe.execute()

    async def write_instance(self, alias: str, worker_id: str, fields: dict[str, str],
                             url: str | None) -> None:
        """An instance's record and its route (``url``: published; None: withdrawn) in one
        transaction, so no reader sees a record and a route that disagree (a FAILED record
        with a live route). Used by the worker's instance state machine only."""

        def build(pipe: Pipeline) -> None:
            pipe.hset(self.k.instance(alias, worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.instances(alias), worker_id)
            if url is None:
                pipe.hdel(self.k.routes(alias), worker_id)
                pipe.hdel(self.k.load(alias), worker_id)
            else:
                pipe.hset(self.k.routes(alias), worker_id, url)

        await self._commit(self.k.routes(alias), build, [self._routes_changed(alias)])
        await self.publish("route", alias=alias, worker=worker_id)

    async def delete_instance(self, alias: str, worker_id: str) -> None:

        def build(pipe: Pipeline) -> None:
            pipe.delete(self.k.instance(alias, worker_id))
            pipe.srem(self.k.instances(alias), worker_id)
            pipe.hdel(self.k.routes(alias), worker_id)
            pipe.hdel(self.k.load(alias), worker_id)

        await self._commit(self.k.routes(alias), build, [self._routes_changed(alias)])
        await self.publish("route", alias=alias, worker=worker_id)

    async def instances_of(self, alias: str) -> dict[str, dict[str, str]]:
        ids = await self._members(self.k.instances(alias))
        raws = await self._hashes([self.k.instance(alias, w) for w in ids])
        return {w: raw for w, raw in zip(ids, raws, strict=True)
                if raw and self._instance_ok(alias, w, raw)}

    def _instance_ok(self, alias: str, worker_id: str, raw: dict[str, str]) -> bool:
        """Whether an instance record parses; one that does not is reported and skipped
        (its worker rewrites the whole record at its next change)."""
        try:
            parse_instance(self.k.instance(alias, worker_id), raw)
        except BadRecord as e:
            self._skip(e)
            return False
        return True

    async def set_route(self, alias: str, worker_id: str, url: str | None) -> None:
        """Publish (url) or withdraw (None) this worker's route for ``alias``."""

        def build(pipe: Pipeline) -> None:
            if url is None:
                pipe.hdel(self.k.routes(alias), worker_id)
            else:
                pipe.hset(self.k.routes(alias), worker_id, url)

        await self._commit(self.k.routes(alias), build, [self._routes_changed(alias)])
        await self.publish("route", alias=alias, worker=worker_id)

    # ------------------------------------------------------------------ router reads
    async def versions(self) -> tuple[str, str]:
        m, r = await self.r.mget([self.k.models_version, self.k.routes_version])
        return (str(m or "0"), str(r or "0"))

    async def route_changes(self, after: str | None, limit: int,
                            models_after: str | None = None,
                            workers: Iterable[str] = ()) -> RouteChanges:
        """The versions, each log's newest id and the aliases logged after ``after`` in the
        routes log and after ``models_after`` in the models log (ids an earlier call
        returned; None: only the newest id), and which of ``workers`` are alive, read
        atomically in one round trip."""
        logs = ((self.k.routes_log, after), (self.k.models_log, models_after))
        ids = sorted(workers)

        async def snapshot() -> list[Any]:
            async with self._txn(self.k.routes_version) as pipe:
                if ids and not self.cluster:
                    pipe.mget([self.k.worker_alive(w) for w in ids])
                pipe.mget([self.k.models_version, self.k.routes_version])
                for log, since in logs:
                    pipe.xrevrange(log, "+", "-", count=1)
                    if since is not None:
                        pipe.xrange(log, f"({since}", "+", count=limit + 1)
                return await pipe.execute(raise_on_error=False)

        if self.cluster:
            # The heartbeats are in their workers' slots: read alongside the snapshot of the
            # counters and logs (which needs one; the heartbeats do not), at the same time.
            flags, got = await asyncio.gather(
                self._mget([self.k.worker_alive(w) for w in ids]), snapshot())
            replies = iter(got)
        else:
            replies = iter(await snapshot())
            flags = next(replies) if ids else []
        m, r = self._checked(self.k.models_version, next(replies), [None, None])
        found: list[tuple[str, list[str] | None]] = []
        for log, since in logs:
            # A log of the wrong type reads as one that cannot account for the changes.
            newest = _newest(self._checked(log, next(replies), []))
            listed = None if since is None else self._checked(log, next(replies), None)
            found.append((newest, None if listed is None else _logged_aliases(listed)))
        return RouteChanges(versions=(str(m or "0"), str(r or "0")),
                            last_id=found[0][0], aliases=found[0][1],
                            models_last_id=found[1][0], models=found[1][1],
                            alive={w for w, f in zip(ids, flags, strict=True) if f is not None})

    async def all_routes(self, aliases: Iterable[str]) -> dict[str, dict[str, str]]:
        names = list(aliases)
        raws = await self._hashes([self.k.routes(a) for a in names])
        return dict(zip(names, raws, strict=True))

    async def loads(self, aliases: list[str]) -> dict[str, dict[str, float]]:
        raws = await self._hashes([self.k.load(a) for a in aliases])
        return {a: self._parse_load(a, raw) for a, raw in zip(aliases, raws, strict=True)}

    def _parse_load(self, alias: str, raw: dict[str, str]) -> dict[str, float]:
        out = {}
        for w, v in raw.items():
            try:
                out[w] = parse_load(self.k.load(alias), w, v)
            except BadRecord as e:
                self._skip(e)
        return out

    async def set_load(self, alias: str, worker_id: str, load: float | None) -> None:
        if load is None:
            await self.r.hdel(self.k.load(alias), worker_id)
        else:
            await self.r.hset(self.k.load(alias), worker_id, f"{load:g}")

    async def instances_by_alias(self, aliases: list[str]) -> dict[str, dict[str, dict[str, str]]]:
        """alias -> worker -> instance record, for many aliases in two round trips."""
        replies = await self._reads([self.k.instances(a) for a in aliases], ("SMEMBERS",))
        members = [self._checked(self.k.instances(a), r, set())
                   for a, r in zip(aliases, replies, strict=True)]
        pairs = [(a, w) for a, ws in zip(aliases, members, strict=True) for w in sorted(ws)]
        raws = await self._hashes([self.k.instance(a, w) for a, w in pairs])
        out: dict[str, dict[str, dict[str, str]]] = {a: {} for a in aliases}
        for (a, w), raw in zip(pairs, raws, strict=True):
            if raw and self._instance_ok(a, w, raw):
                out[a][w] = raw
        return out
