"""Workers: registration, heartbeats (TTL keys) and liveness."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterable, Mapping
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import WatchError

from shared.engine_policy import EngineFlags
from shared.models import Heartbeat, WorkerRegistration, WorkerView
from shared.records import BadRecord, parse_worker
from shared.store.base import NotLeader, StoreBase

# The worker's record, only while its heartbeat is absent (Redis Cluster: one worker's slot).
_DELETE_IF_DEAD_LUA = """
if redis.call('EXISTS', KEYS[1]) == 1 then return 0 end
return redis.call('DEL', KEYS[2])
"""


class WorkersStore(StoreBase):
    async def register_worker(self, reg: WorkerRegistration, ttl_s: float) -> bool:
        """Record a worker and its first heartbeat. False, and nothing written, when a live
        worker holds ``reg.worker_id`` at another URL: a registration may not take over a
        live worker's identity (a worker that moved waits out its old heartbeat's TTL)."""
        wid = reg.worker_id
        alive_key, record = self.k.worker_alive(wid), self.k.worker(wid)
        for _ in range(5):  # a concurrent heartbeat of the same worker restarts the check
            async with self._txn(record) as pipe:
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
            # On a cluster the index is in the scheduler's slot: listed right after; every
            # heartbeat that writes the record lists the worker again (a full one at least
            # every RESYNC_S), so one lost here is repaired by then.
            await self._listed(wid)
            await self.publish("worker", worker=wid)
            return True
        return False

    def _write_registration(self, pipe: Pipeline, reg: WorkerRegistration, ttl_s: float) -> None:
        now = repr(time.time())
        if not self.cluster:
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
        if self.cluster:
            return await self._remove_in_steps(token, worker_id)
        async with self.r.pipeline(transaction=True) as pipe:
            try:
                await pipe.watch(self.k.lease, alive_key, assign)
                if await pipe.get(self.k.lease) != token:
                    raise NotLeader(token)
                if await pipe.exists(alive_key) or await pipe.hlen(assign):
                    return False
                pipe.multi()
                pipe.srem(self.k.workers, worker_id)
                pipe.hdel(self.k.worker_revs, worker_id)
                pipe.delete(self.k.worker(worker_id), assign, self.k.ledger(worker_id))
                pipe.hincrby(self.k.assign_versions, worker_id, 1)
                pipe.hincrby(self.k.assign_versions, "*", 1)
                await pipe.execute()
            except WatchError:
                return False
        await self.publish("worker", worker=worker_id)
        return True

    async def _remove_in_steps(self, token: str, worker_id: str) -> bool:
        """:meth:`remove_dead_worker` on a cluster, where the worker's records and the
        scheduler's (lease, index, assignments, ledger) are in two slots: a fenced step in the
        scheduler's slot that checks the worker holds no assignment and drops it from the
        index, its assignments and ledger; then, in the worker's slot, its record, only
        while its heartbeat is still absent. Its heartbeat is read before the first step; a
        worker that beats again in between finds its record (kept) and lists itself again at
        its next heartbeat (which always re-adds it to the index)."""
        alive_key, assign = self.k.worker_alive(worker_id), self.k.assign(worker_id)
        if await self.r.exists(alive_key):
            return False
        async with self._txn(assign) as pipe:
            try:
                await pipe.watch(self.k.lease, assign)
                if await pipe.get(self.k.lease) != token:
                    raise NotLeader(token)
                if await pipe.hlen(assign):
                    return False
                pipe.multi()
                pipe.srem(self.k.workers, worker_id)
                pipe.hdel(self.k.worker_revs, worker_id)
                pipe.delete(assign, self.k.ledger(worker_id))
                pipe.hincrby(self.k.assign_versions, worker_id, 1)
                pipe.hincrby(self.k.assign_versions, "*", 1)
                await pipe.execute()
            except WatchError:
                return False
        removed = await self.r.eval(_DELETE_IF_DEAD_LUA, 2, alive_key, self.k.worker(worker_id))
        if not removed:
            await self._listed(worker_id)  # it beat again meanwhile: listed again at once
        await self.publish("worker", worker=worker_id)
        return bool(removed)

    async def heartbeat(self, worker_id: str, hb: Heartbeat, ttl_s: float) -> bool | None:
        """Refresh liveness. None: unknown worker (register first). False: the alive key had
        expired, so the manager may have re-placed this worker's models. True: all well.

        A beat that reports nothing new (every field of ``hb`` None: the worker sends only
        what changed, and everything every ``RESYNC_S``) is one ``SET ... XX`` of the alive
        key: at thousands of workers the beats are most of Redis's steady load, and the
        transaction that also rewrote the record cost it ~4x as much (``XX``, which writes
        only a key that is there, costs Redis half what ``GET`` did: no old value to copy
        into the reply; a lapsed key takes the slower path below). A beat that reports
        something writes the record, lists the worker and bumps its ``worker:revs`` entry
        (the scheduler reads again only the records whose entry moved)."""
        now = repr(time.time())
        alive, record = self.k.worker_alive(worker_id), self.k.worker(worker_id)
        fields = _beat_fields(hb)
        lapsed = False
        if not fields:
            if await self.r.set(alive, now, px=int(ttl_s * 1000), xx=True):
                return True  # the key was there, so is the record (removed only without it)
            lapsed = True
        fields["last_seen"] = now
        for _ in range(5):  # the record changed between the check and the write: again
            async with self._txn(record) as pipe:
                try:
                    # Under WATCH: a collector deleting the record between the check and
                    # the write fails the write, instead of leaving a partial record (the
                    # fields of a beat, no URL) that no registration would ever repair.
                    await pipe.watch(record)
                    if not await pipe.exists(record):
                        return None
                    pipe.multi()
                    pipe.set(alive, now, px=int(ttl_s * 1000), get=True)
                    pipe.hset(record, mapping=cast(Mapping[Any, Any], fields))
                    if not self.cluster:
                        pipe.sadd(self.k.workers, worker_id)
                    previous = (await pipe.execute())[0]
                except WatchError:
                    continue
            await self._listed(worker_id)
            return previous is not None and not lapsed
        return None  # written over five times in a row: registered again, to be safe

    async def _listed(self, worker_id: str) -> None:
        """After a write to a worker's record: the index (on a cluster it is in the
        scheduler's slot, not the record's) and the record's count in ``worker:revs``,
        written after the record so that a reader of the count reads the record at least as
        new. A count key of the wrong type is reported, not fatal: the scheduler then reads
        every record at its full passes only."""
        async with self._txn(self.k.workers) as pipe:
            pipe.sadd(self.k.workers, worker_id)
            pipe.hincrby(self.k.worker_revs, worker_id, 1)
            replies = await pipe.execute(raise_on_error=False)
        self._checked(self.k.worker_revs, replies[1], 0)

    async def worker_count(self) -> int:
        """How many workers the pool lists (alive or not yet collected): what a worker
        paces its heartbeats by (shared/pace.py)."""
        return int(await self.r.scard(self.k.workers))

    async def pool_id(self, candidate: str) -> str:
        """The pool's id: ``candidate`` when none exists yet (SET NX), else the existing one.

        A worker passes the id it already uses, so a flushed Redis gets it back rather than a
        new one that would disown the engines running now."""
        async with self._txn(self.k.pool_id) as pipe:
            pipe.set(self.k.pool_id, candidate, nx=True)
            pipe.get(self.k.pool_id)
            _, value = await pipe.execute()
        return str(value)

    async def set_engine_flags(self, worker_id: str, version: str, flags: list[str]) -> None:
        """What the worker's installed vLLM accepts (its version and its parser's flags), for
        the routers' check of new registrations."""
        await self.r.hset(self.k.worker(worker_id), mapping={
            "vllm_version": version, "vllm_flags": json.dumps(sorted(flags))})
        await self._listed(worker_id)

    async def live_vllm_flags(self) -> list[EngineFlags]:
        """The vLLM flag sets reported by live workers (those that have reported one)."""
        ids = await self._members(self.k.workers)
        async with self._batch() as pipe:
            for w in ids:
                pipe.hmget(self.k.worker(w), ["vllm_version", "vllm_flags"])
                pipe.exists(self.k.worker_alive(w))
            flat = await pipe.execute(raise_on_error=False)
        out = []
        for i, w in enumerate(ids):
            # A worker key of the wrong type is reported and skipped: it must not block
            # every vLLM registration.
            fields = self._checked(self.k.worker(w), flat[2 * i], [None, None])
            (version, flags), alive = fields, flat[2 * i + 1] == 1
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

    async def worker_ids(self) -> list[str]:
        """Every registered worker id, including those whose record does not parse."""
        return await self._members(self.k.workers)

    async def list_workers(self) -> list[WorkerView]:
        return await self.workers_by_id(await self._members(self.k.workers))

    async def workers_by_id(self, ids: list[str]) -> list[WorkerView]:
        """The records of ``ids`` that exist and parse (the others are reported and left
        out). A live worker's ``last_seen`` is its heartbeat key's value: a beat that
        reports nothing new writes only that key."""
        flat = await self._reads([key for w in ids
                                  for key in (self.k.worker(w), self.k.worker_alive(w))],
                                 ("HGETALL", "GET"))
        out = []
        for i, w in enumerate(ids):
            raw, beat = self._checked(self.k.worker(w), flat[2 * i], {}), flat[2 * i + 1]
            if raw and _later(beat, raw.get("last_seen")):
                raw["last_seen"] = beat
            try:
                out.append(parse_worker(self.k.worker(w), w, raw, beat is not None))
            except BadRecord as e:
                # Left out: nothing new is placed there and its assignments are not read;
                # it still serves what it runs (its own loops do not read this record).
                self._skip(e)
        return out

    async def heartbeat_ttls(self, worker_ids: list[str]) -> dict[str, int]:
        """Each worker's heartbeat key's time to live, ms (Redis's clock: no client's clock
        matters): -2 when it is gone (the worker is dead), -1 when it has no expiry."""
        replies = await self._reads([self.k.worker_alive(w) for w in worker_ids], ("PTTL",))
        for r in replies:
            if isinstance(r, Exception):
                raise r  # a refused read says nothing of liveness: the tick fails instead
        return dict(zip(worker_ids, (int(r) for r in replies), strict=True))

    async def worker_revs(self) -> dict[str, str]:
        """Worker id -> its record's write count (``worker:revs``; a key of the wrong type
        is reported and read as empty: every record then counts as moved)."""
        return (await self._hashes([self.k.worker_revs]))[0]

    async def alive(self, worker_ids: Iterable[str]) -> set[str]:
        ids = list(worker_ids)
        if not ids:
            return set()
        flags = await self._mget([self.k.worker_alive(w) for w in ids])
        return {w for w, f in zip(ids, flags, strict=True) if f is not None}


def _beat_fields(hb: Heartbeat) -> dict[str, str]:
    """The record fields a heartbeat reports (those it carries: None is "unchanged")."""
    fields: dict[str, str] = {}
    if hb.load is not None:
        fields["load"] = json.dumps(hb.load)
    if hb.gpus is not None:
        fields["gpus"] = json.dumps([g.model_dump() for g in hb.gpus])
    if hb.gpu_message is not None:
        fields["gpu_message"] = hb.gpu_message
    if hb.local_models is not None:
        fields["local_models"] = json.dumps([m.model_dump() for m in hb.local_models])
    if hb.cache_free_mb is not None:
        fields["cache_free_mb"] = str(hb.cache_free_mb)
    return fields



def _later(beat: object, recorded: str | None) -> bool:
    """Whether a heartbeat key's value is a time later than the record's ``last_seen``
    (either not a number: no, and the record is checked as it is)."""
    if not isinstance(beat, str):
        return False
    try:
        return float(recorded or "0") < float(beat) < math.inf
    except ValueError:
        return False
