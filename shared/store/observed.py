"""Observed state written by workers (instances, routes) and what routers read."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any, cast

from shared.store.base import StoreBase


class ObservedStore(StoreBase):
    async def put_instance(self, alias: str, worker_id: str, fields: dict[str, str]) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.instance(alias, worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.instances(alias), worker_id)
            await pipe.execute()

    async def delete_instance(self, alias: str, worker_id: str) -> None:
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.delete(self.k.instance(alias, worker_id))
            pipe.srem(self.k.instances(alias), worker_id)
            pipe.hdel(self.k.routes(alias), worker_id)
            pipe.hdel(self.k.load(alias), worker_id)
            pipe.incr(self.k.routes_version)
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
            pipe.incr(self.k.routes_version)
            await pipe.execute()
        await self.publish("route", alias=alias, worker=worker_id)

    # ------------------------------------------------------------------ router reads
    async def versions(self) -> tuple[str, str]:
        m, r = await self.r.mget([self.k.models_version, self.k.routes_version])
        return (str(m or "0"), str(r or "0"))

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
