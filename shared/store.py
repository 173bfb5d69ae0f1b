"""The only module that talks to Redis.

Every multi-key change is one MULTI/EXEC transaction here. Writes that only the scheduling
leader may make are *fenced*: they WATCH the lease key and run only while it still holds this
manager's ``holder|epoch`` token, so a manager that lost its lease cannot place anything.
Keys are named in :mod:`shared.keys`; docs/redis.md explains them.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, cast

import orjson
import redis.asyncio as aioredis
from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from shared.errors import Conflict
from shared.keys import Keys
from shared.models import Assignment, GpuInfo, Heartbeat, ModelSpec, WorkerRegistration, WorkerView


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


def connect(url: str) -> aioredis.Redis:
    """A pooled client; short timeouts so a dead Redis gives a quick, clear error."""
    return aioredis.from_url(
        url, decode_responses=True, socket_connect_timeout=2.0, socket_timeout=5.0
    )


# Renews the lease when this holder has it, takes it when nobody does (with a new epoch).
_LEASE_LUA = """
local cur = redis.call('GET', KEYS[1])
if cur then
  local sep = string.find(cur, '|', 1, true)
  if sep and string.sub(cur, 1, sep - 1) == ARGV[1] then
    redis.call('PEXPIRE', KEYS[1], ARGV[2])
    return tonumber(string.sub(cur, sep + 1))
  end
  return 0
end
local e = redis.call('INCR', KEYS[2])
redis.call('SET', KEYS[1], ARGV[1] .. '|' .. e, 'PX', ARGV[2])
return e
"""

_RELEASE_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""


class Store:
    def __init__(self, client: aioredis.Redis, keys: Keys, *, events: bool = True) -> None:
        self.r = client
        self.k = keys
        self.events_enabled = events

    async def close(self) -> None:
        await self.r.aclose()

    async def _members(self, key: str) -> list[str]:
        return sorted(cast(set[str], await self.r.smembers(key)))

    async def ping(self) -> bool:
        return bool(await self.r.ping())

    # ------------------------------------------------------------------ events (hints only)
    async def publish(self, kind: str, **fields: str) -> None:
        if self.events_enabled:
            await self.r.publish(self.k.events, orjson.dumps({"kind": kind, **fields}))

    # ------------------------------------------------------------------ models
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
        """Remove the alias, its routes and every assignment of it. False if unknown."""
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
                    pipe.delete(self.k.hold(alias), self.k.placement(alias), self.k.routes(alias))
                    for w in workers:
                        pipe.hdel(self.k.assign(w), alias)
                    pipe.incr(self.k.models_version)
                    pipe.incr(self.k.routes_version)
                    await pipe.execute()
                    break
                except WatchError:
                    continue
        await self.publish("model", alias=alias)
        return True

    # ------------------------------------------------------------------ workers
    async def register_worker(self, reg: WorkerRegistration, ttl_s: float) -> None:
        now = repr(time.time())
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.sadd(self.k.workers, reg.worker_id)
            pipe.hset(self.k.worker(reg.worker_id), mapping={
                "url": reg.url,
                "engines": json.dumps(reg.engines),
                "gpus": json.dumps([g.model_dump() for g in reg.gpus]),
                "gpu_message": reg.gpu_message,
                "version": reg.version,
                "registered_at": now,
                "last_seen": now,
            })
            pipe.set(self.k.worker_alive(reg.worker_id), now, px=int(ttl_s * 1000))
            await pipe.execute()
        await self.publish("worker", worker=reg.worker_id)

    async def heartbeat(self, worker_id: str, hb: Heartbeat, ttl_s: float) -> bool | None:
        """Refresh liveness. None: unknown worker (register first). False: the alive key had
        expired, so the manager may have re-placed this worker's models. True: all well."""
        if not await self.r.exists(self.k.worker(worker_id)):
            return None
        now = repr(time.time())
        fields: dict[str, str] = {"last_seen": now, "load": json.dumps(hb.load)}
        if hb.gpus is not None:
            fields["gpus"] = json.dumps([g.model_dump() for g in hb.gpus])
        if hb.gpu_message is not None:
            fields["gpu_message"] = hb.gpu_message
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self.k.worker_alive(worker_id), now, px=int(ttl_s * 1000), get=True)
            pipe.hset(self.k.worker(worker_id), mapping=cast(Mapping[Any, Any], fields))
            pipe.sadd(self.k.workers, worker_id)
            previous, _, _ = await pipe.execute()
        return previous is not None

    async def unregister_worker_alive(self, worker_id: str) -> None:
        """A worker leaving cleanly drops its heartbeat so the manager re-places at once."""
        await self.r.delete(self.k.worker_alive(worker_id))
        await self.publish("worker", worker=worker_id)

    async def list_workers(self) -> list[WorkerView]:
        ids = await self._members(self.k.workers)
        async with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hgetall(self.k.worker(w))
                pipe.exists(self.k.worker_alive(w))
            flat = await pipe.execute()
        out = []
        for i, w in enumerate(ids):
            raw, alive = flat[2 * i], flat[2 * i + 1]
            out.append(WorkerView(
                worker_id=w,
                url=raw.get("url", ""),
                alive=bool(alive),
                engines=json.loads(raw.get("engines", "[]")),
                gpus=[GpuInfo.model_validate(g) for g in json.loads(raw.get("gpus", "[]"))],
                gpu_message=raw.get("gpu_message", ""),
                version=raw.get("version", ""),
                registered_at=float(raw.get("registered_at", 0)),
                last_seen=float(raw.get("last_seen", 0)),
                load=json.loads(raw.get("load", "{}")),
            ))
        return out

    # ------------------------------------------------------------------ lease and fencing
    async def acquire_lease(self, holder: str, ttl_s: float) -> int:
        """Take or renew the scheduler lease. Returns the epoch held, 0 if another holds it."""
        res = await self.r.eval(
            _LEASE_LUA, 2, self.k.lease, self.k.epoch, holder, int(ttl_s * 1000)
        )
        return int(res)

    async def release_lease(self, token: str) -> None:
        await self.r.eval(_RELEASE_LUA, 1, self.k.lease, token)

    async def lease_holder(self) -> str | None:
        return cast(str | None, await self.r.get(self.k.lease))

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

    # ------------------------------------------------------------------ assignments
    async def assignments(self, worker_ids: Iterable[str]) -> dict[str, dict[str, Assignment]]:
        ids = list(worker_ids)
        async with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hgetall(self.k.assign(w))
            raws = await pipe.execute()
        return {
            w: {a: Assignment.model_validate_json(v) for a, v in raw.items()}
            for w, raw in zip(ids, raws, strict=True)
        }

    async def worker_assignments(self, worker_id: str) -> dict[str, Assignment]:
        return (await self.assignments([worker_id]))[worker_id]

    async def assign(self, token: str, a: Assignment) -> None:
        def build(p: Pipeline) -> None:
            p.hset(self.k.assign(a.worker_id), a.alias, a.model_dump_json())
            p.delete(self.k.placement(a.alias))

        await self._fenced(token, build)
        await self.publish("assign", alias=a.alias, worker=a.worker_id)

    async def unassign(self, token: str, worker_id: str, alias: str) -> None:
        def build(p: Pipeline) -> None:
            p.hdel(self.k.assign(worker_id), alias)

        await self._fenced(token, build)
        await self.publish("assign", alias=alias, worker=worker_id)

    async def forget_dead_worker(self, token: str, worker_id: str, aliases: Iterable[str]) -> None:
        """Drop a dead worker's assignments, routes and instance records in one step."""
        names = list(aliases)

        def build(p: Pipeline) -> None:
            p.delete(self.k.assign(worker_id))
            for alias in names:
                p.hdel(self.k.routes(alias), worker_id)
                p.delete(self.k.instance(alias, worker_id))
                p.srem(self.k.instances(alias), worker_id)
            p.incr(self.k.routes_version)

        await self._fenced(token, build)
        await self.publish("route", worker=worker_id)

    async def manual_assign(self, a: Assignment) -> None:
        """An operator's placement: not fenced (it is not the scheduler's decision), and it
        lifts a manual stop."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.assign(a.worker_id), a.alias, a.model_dump_json())
            pipe.delete(self.k.hold(a.alias), self.k.placement(a.alias))
            pipe.incr(self.k.models_version)
            await pipe.execute()
        await self.publish("assign", alias=a.alias, worker=a.worker_id)

    async def manual_unassign(self, worker_id: str, alias: str) -> bool:
        """An operator's stop: removes the assignment and holds the alias so the scheduler
        does not place it again until someone starts it. False if it was not assigned here."""
        note = json.dumps({"by": worker_id, "at": time.time(), "reason": "stopped manually"})
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hdel(self.k.assign(worker_id), alias)
            pipe.set(self.k.hold(alias), note)
            pipe.incr(self.k.models_version)
            removed, _, _ = await pipe.execute()
        await self.publish("assign", alias=alias, worker=worker_id)
        return bool(removed)

    async def set_placement_reason(self, alias: str, reason: str) -> None:
        await self.r.hset(self.k.placement(alias), mapping={"reason": reason, "at": time.time()})

    async def placement_reason(self, alias: str) -> str | None:
        return cast(str | None, await self.r.hget(self.k.placement(alias), "reason"))

    # ------------------------------------------------------------------ observed state
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
            pipe.incr(self.k.routes_version)
            await pipe.execute()
        await self.publish("route", alias=alias, worker=worker_id)

    async def instances_of(self, alias: str) -> dict[str, dict[str, str]]:
        ids = await self._members(self.k.instances(alias))
        async with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hgetall(self.k.instance(alias, w))
            raws = await pipe.execute()
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
        async with self.r.pipeline(transaction=False) as pipe:
            for a in names:
                pipe.hgetall(self.k.routes(a))
            raws = await pipe.execute()
        return dict(zip(names, raws, strict=True))

    async def alive(self, worker_ids: Iterable[str]) -> set[str]:
        ids = list(worker_ids)
        if not ids:
            return set()
        flags = await self.r.mget([self.k.worker_alive(w) for w in ids])
        return {w for w, f in zip(ids, flags, strict=True) if f is not None}

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
