"""Desired state: model specs, written by the admin API."""

from __future__ import annotations

import time

from redis.exceptions import WatchError

from shared.errors import Conflict
from shared.models import ModelSpec
from shared.store.base import StoreBase, StoredModel, spec_fingerprint


class ModelsStore(StoreBase):
    async def register_model(self, spec: ModelSpec) -> bool:
        """Store ``spec``; True if new, False if the same spec was already there.

        Raises :class:`Conflict` when the alias exists with a different spec.
        """
        key = self.k.model(spec.alias)
        fp = spec_fingerprint(spec)
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    existing = await pipe.hget(key, "fingerprint")
                    if existing == fp:
                        return False
                    if existing is not None:
                        raise Conflict(
                            f"model '{spec.alias}' is already registered with a different "
                            "spec; delete it first",
                            param="alias",
                        )
                    now = time.time()
                    pipe.multi()
                    pipe.hset(key, mapping={
                        "spec": spec.model_dump_json(),
                        "model_name": spec.model_name,
                        "engine": spec.engine,
                        "fingerprint": fp,
                        "version": f"{fp[:12]}-{now:.6f}",
                        "created_at": repr(now),
                    })
                    pipe.sadd(self.k.models, spec.alias)
                    pipe.delete(self.k.hold(spec.alias), self.k.placement(spec.alias))
                    pipe.incr(self.k.models_version)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self.publish("model", alias=spec.alias)
        return True

    def _parse_model(self, raw: dict[str, str], hold: str | None) -> StoredModel | None:
        if not raw.get("spec"):
            return None
        return StoredModel(
            spec=ModelSpec.model_validate_json(raw["spec"]),
            version=raw.get("version", ""),
            created_at=float(raw.get("created_at", "0")),
            hold=hold,
        )

    async def get_model(self, alias: str) -> StoredModel | None:
        async with self.r.pipeline(transaction=False) as pipe:
            pipe.hgetall(self.k.model(alias))
            pipe.get(self.k.hold(alias))
            raw, hold = await pipe.execute()
        return self._parse_model(raw, hold)

    async def get_models(self, aliases: list[str]) -> dict[str, StoredModel]:
        """The registered ones among ``aliases``, in one round trip."""
        async with self.r.pipeline(transaction=False) as pipe:
            for a in aliases:
                pipe.hgetall(self.k.model(a))
                pipe.get(self.k.hold(a))
            flat = await pipe.execute()
        out = {}
        for i, a in enumerate(aliases):
            m = self._parse_model(flat[2 * i], flat[2 * i + 1])
            if m is not None:
                out[a] = m
        return out

    async def list_models(self) -> list[StoredModel]:
        aliases = await self._members(self.k.models)
        async with self.r.pipeline(transaction=False) as pipe:
            for a in aliases:
                pipe.hgetall(self.k.model(a))
                pipe.get(self.k.hold(a))
            flat = await pipe.execute()
        out = [self._parse_model(flat[i], flat[i + 1]) for i in range(0, len(flat), 2)]
        return [m for m in out if m is not None]

    async def delete_model(self, alias: str) -> bool:
        """Remove the alias, its routes, instance records and every assignment of it.
        False if unknown."""
        workers = await self._members(self.k.workers)
        key = self.k.model(alias)
        async with self.r.pipeline(transaction=True) as pipe:
            while True:
                try:
                    await pipe.watch(key)
                    if not await pipe.exists(key):
                        return False
                    pipe.multi()
                    pipe.delete(key)
                    pipe.srem(self.k.models, alias)
                    pipe.delete(self.k.hold(alias), self.k.manual(alias), self.k.intent(alias),
                                self.k.placement(alias), self.k.routes(alias),
                                self.k.demand(alias), self.k.queue(alias), self.k.stats(alias),
                                self.k.samples(alias, "cold_start"), self.k.samples(alias, "wake"),
                                self.k.load(alias))
                    for w in workers:
                        pipe.hdel(self.k.assign(w), alias)
                        # FAILED (or any) records of the alias must not outlive it, even
                        # those of a worker that is dead and will never clean up.
                        pipe.delete(self.k.instance(alias, w))
                    pipe.delete(self.k.instances(alias))
                    pipe.incr(self.k.models_version)
                    pipe.incr(self.k.routes_version)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self.publish("model", alias=alias)
        return True

