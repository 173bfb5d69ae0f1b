"""Workers: registration, heartbeats (TTL keys) and liveness."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from shared.models import GpuInfo, Heartbeat, WorkerRegistration, WorkerView
from shared.store.base import NotLeader, StoreBase


class WorkersStore(StoreBase):
    async def register_worker(self, reg: WorkerRegistration, ttl_s: float) -> bool:
        """Record a worker and its first heartbeat. False, and nothing written, when a live
        worker holds ``reg.worker_id`` at another URL: a registration may not take over a
        live worker's identity (a worker that moved waits out its old heartbeat's TTL)."""
        wid = reg.worker_id
        alive_key, record = self.k.worker_alive(wid), self.k.worker(wid)
        for _ in range(5):  # a concurrent heartbeat of the same worker restarts the check
            async with self.r.pipeline(transaction=True) as pipe:
                try:
                    await pipe.watch(alive_key, record)
                    if await pipe.exists(alive_key) and \
                            await pipe.hget(record, "url") not in (None, reg.url):
                        return False
                    pipe.multi()
                    self._write_registration(pipe, reg, ttl_s)
                    await pipe.execute()
                except WatchError:
                    continue
            await self.publish("worker", worker=wid)
            return True
        return False

    def _write_registration(self, pipe: Pipeline, reg: WorkerRegistration, ttl_s: float) -> None:
        now = repr(time.time())
        pipe.sadd(self.k.workers, reg.worker_id)
        pipe.hset(self.k.worker(reg.worker_id), mapping={
            "url": reg.url,
            "engines": json.dumps(reg.engines),
            "gpus": json.dumps([g.model_dump() for g in reg.gpus]),
            "gpu_message": reg.gpu_message,
            "version": reg.version,
            "max_cpu_engines": "" if reg.max_cpu_engines is None else str(reg.max_cpu_engines),
            "registered_at": now,
            "last_seen": now,
        })
        pipe.set(self.k.worker_alive(reg.worker_id), now, px=int(ttl_s * 1000))

    async def remove_dead_worker(self, token: str, worker_id: str) -> bool:
        """Delete every record of a worker that is dead (no heartbeat) and holds no
        assignment, only while ``token`` holds the scheduler lease. False when the worker
        came back or got an assignment meanwhile (checked in the transaction)."""
        alive_key, assign = self.k.worker_alive(worker_id), self.k.assign(worker_id)
        async with self.r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.k.lease, alive_key, assign)
                if await pipe.get(self.k.lease) != token:
                    raise NotLeader(token)
                if await pipe.exists(alive_key) or await pipe.hlen(assign):
                    return False
                pipe.multi()
                pipe.srem(self.k.workers, worker_id)
                pipe.delete(self.k.worker(worker_id), assign, self.k.ledger(worker_id))
                await pipe.execute()
            except WatchError:
                return False
        await self.publish("worker", worker=worker_id)
        return True

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
            gpus, message = _gpus(raw)
            out.append(WorkerView(
                worker_id=w,
                url=raw.get("url", ""),
                alive=bool(alive),
                engines=json.loads(raw.get("engines", "[]")),
                gpus=gpus,
                gpu_message=message,
                version=raw.get("version", ""),
                registered_at=float(raw.get("registered_at", 0)),
                last_seen=float(raw.get("last_seen", 0)),
                load=json.loads(raw.get("load", "{}")),
                max_cpu_engines=_int_or_none(raw.get("max_cpu_engines")),
            ))
        return out

    async def alive(self, worker_ids: Iterable[str]) -> set[str]:
        ids = list(worker_ids)
        if not ids:
            return set()
        flags = await self.r.mget([self.k.worker_alive(w) for w in ids])
        return {w for w, f in zip(ids, flags, strict=True) if f is not None}


def _gpus(raw: Mapping[str, str]) -> tuple[list[GpuInfo], str]:
    """A record's GPUs; none, and the reason as its message, when they are not valid (a
    record written before the bounds, or by hand): one bad record must not fail every read."""
    try:
        return ([GpuInfo.model_validate(g) for g in json.loads(raw.get("gpus", "[]"))],
                raw.get("gpu_message", ""))
    except ValueError as e:
        return [], f"invalid GPU report in the worker record: {str(e)[:200]}"


def _int_or_none(value: str | None) -> int | None:
    return int(value) if value and value.isdigit() else None
