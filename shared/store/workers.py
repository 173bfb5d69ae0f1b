"""Workers: registration, heartbeats (TTL keys) and liveness."""

from __future__ import annotations

import json
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from shared.engine_policy import EngineFlags
from shared.models import GpuInfo, Heartbeat, WorkerRegistration, WorkerView
from shared.store.base import StoreBase


class WorkersStore(StoreBase):
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

    async def pool_id(self, candidate: str) -> str:
        """The pool's id: ``candidate`` when none exists yet (SET NX), else the existing one.

        A worker passes the id it already uses, so a flushed Redis gets it back rather than a
        new one that would disown the engines running now."""
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.set(self.k.pool_id, candidate, nx=True)
            pipe.get(self.k.pool_id)
            _, value = await pipe.execute()
        return str(value)

    async def set_engine_flags(self, worker_id: str, version: str, flags: list[str]) -> None:
        """What the worker's installed vLLM accepts (its version and its parser's flags), for
        the routers' check of new registrations."""
        await self.r.hset(self.k.worker(worker_id), mapping={
            "vllm_version": version, "vllm_flags": json.dumps(sorted(flags))})

    async def live_vllm_flags(self) -> list[EngineFlags]:
        """The vLLM flag sets reported by live workers (those that have reported one)."""
        ids = await self._members(self.k.workers)
        async with self.r.pipeline(transaction=False) as pipe:
            for w in ids:
                pipe.hmget(self.k.worker(w), ["vllm_version", "vllm_flags"])
                pipe.exists(self.k.worker_alive(w))
            flat = await pipe.execute()
        out = []
        for i, w in enumerate(ids):
            (version, flags), alive = flat[2 * i], flat[2 * i + 1]
            if not alive or not version or not flags:
                continue
            try:
                names = frozenset(str(f) for f in json.loads(flags))
            except (ValueError, TypeError):
                continue  # a garbled record must not block registrations
            out.append(EngineFlags(w, version, names))
        return out

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
                vllm_version=raw.get("vllm_version", ""),
                registered_at=float(raw.get("registered_at", 0)),
                last_seen=float(raw.get("last_seen", 0)),
                load=json.loads(raw.get("load", "{}")),
            ))
        return out

    async def alive(self, worker_ids: Iterable[str]) -> set[str]:
        ids = list(worker_ids)
        if not ids:
            return set()
        flags = await self.r.mget([self.k.worker_alive(w) for w in ids])
        return {w for w, f in zip(ids, flags, strict=True) if f is not None}
