"""The scheduler's lease and the assignments it alone writes (fenced by the lease)."""

from __future__ import annotations

import functools
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.asyncio.client import Pipeline
from redis.commands.core import AsyncScript
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import ResponseError
from redis.exceptions import TimeoutError as RedisTimeoutError

from shared.models import Assignment, Reservation
from shared.records import BadRecord, parse_assignment, parse_reservation
from shared.store.base import BUMP_FN_LUA, NotLeader, StoreBase
from shared.store.observed import _logged_aliases, _newest

# Renews the lease when this holder has it, takes it when nobody does (with a new epoch).
# From this many workers the scheduler's per-tick probe goes out as bytes packed once per
# view of the pool (SchedulingStore._probe_packed): EXISTS with 5,000 keys cost the manager
# ~40 ms of redis-py packing per 0.1 s tick, and a script splitting one joined argument cost
# Redis ~3 ms per tick instead.
_PROBE_PACKED_MIN = 1000


def _resp(*args: str) -> bytes:
    """One command in the Redis protocol."""
    out = [b"*%d\r\n" % len(args)]
    for a in args:
        data = a.encode()
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


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


_RELEASE_RESERVATION_LUA = """
if redis.call('HEXISTS', KEYS[1], ARGV[1]) == 1 then return 0 end
local n = redis.call('HDEL', KEYS[2], ARGV[1])
if n == 1 then
  redis.call('HINCRBY', KEYS[3], ARGV[2], 1)
  redis.call('HINCRBY', KEYS[3], '*', 1)
end
return n
"""


# One alias's part of forgetting a dead worker, atomic in the alias's slot (Redis Cluster).
_FORGET_INSTANCE_LUA = """
redis.call('HDEL', KEYS[1], ARGV[1])
redis.call('DEL', KEYS[2])
redis.call('HDEL', KEYS[4], ARGV[1])
return redis.call('SREM', KEYS[3], ARGV[1])
"""
_BUMP_LUA = BUMP_FN_LUA + "return bump(KEYS[1])"
# A dead worker's routes, instance records and loads under many aliases at once, fenced by
# the lease (KEYS[1]). Their keys go as one newline-joined argument, four per alias (as the
# store's bulk reads pass theirs: one argument to pack, not thousands), so a single Redis
# only. A key of the wrong type is skipped and named in the reply: it must not stop the
# cleanup of the others.
_FORGET_MANY_LUA = """
if redis.call('GET', KEYS[1]) ~= ARGV[1] then return redis.error_reply('NOTLEADER') end
local w, refused, keys = ARGV[2], {}, {}
for key in string.gmatch(ARGV[3], "[^\\n]+") do keys[#keys + 1] = key end
local function try(cmd, key, ...)
  local r = redis.pcall(cmd, key, ...)
  if type(r) == 'table' and r.err then refused[#refused + 1] = key end
end
for i = 1, #keys, 4 do
  try('HDEL', keys[i], w)
  try('DEL', keys[i + 1])
  try('SREM', keys[i + 2], w)
  try('HDEL', keys[i + 3], w)
end
return refused
"""
# Aliases per forget script: 2,000 commands, about a millisecond of Redis each.
_FORGET_CHUNK = 500


# The field of ``assign:versions`` bumped with every worker's: one read tells whether any
# moved (worker ids cannot contain "*").
ANY_WORKER = "*"


@dataclass(frozen=True)
class SchedulerProbe:
    """What the scheduler's tick checks before reading more: cheap to ask every tick."""

    alive: int
    """How many of the workers asked about have their heartbeat key."""
    any_version: str
    """``assign:versions``'s ANY_WORKER field: moves with every worker's version."""
    workers: int
    """Entries of the workers index."""


@dataclass(frozen=True)
class LogRead:
    """A change counter and its log, read together (one MULTI/EXEC)."""

    version: str
    last_id: str
    """The log's newest entry ("0-0" when empty): where the next read starts."""
    aliases: list[str] | None
    """The aliases logged after the id asked for (None: none asked, or unreadable)."""


@dataclass(frozen=True)
class Unassign:
    """One assignment to remove, as a write of :meth:`SchedulingStore.write_fenced`."""

    worker_id: str
    alias: str


class SchedulingStore(StoreBase):
    @functools.cached_property
    def _forget_script(self) -> AsyncScript:
        return self.r.register_script(_FORGET_MANY_LUA)

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

    async def assignments(self, worker_ids: Iterable[str]) -> dict[str, dict[str, Assignment]]:
        ids = list(worker_ids)
        raws = await self._hashes([self.k.assign(w) for w in ids])
        return {w: self._parse_assigns(w, raw) for w, raw in zip(ids, raws, strict=True)}

    def _parse_assigns(self, worker_id: str, raw: dict[str, str]) -> dict[str, Assignment]:
        """An ``assign:{worker}`` hash; an entry that does not parse is skipped (so the
        scheduler places the alias again, overwriting it)."""
        key = self.k.assign(worker_id)
        out = {}
        for alias, v in raw.items():
            try:
                out[alias] = parse_assignment(key, worker_id, alias, v)
            except BadRecord as e:
                self._skip(e)
        return out

    async def worker_assignments(self, worker_id: str) -> dict[str, Assignment]:
        return (await self.assignments([worker_id]))[worker_id]

    def _touched(self, p: Pipeline, worker_id: str) -> None:
        """In the transaction that writes a worker's assignments or ledger: bump its
        assignment version (its readers re-read only when it moved)."""
        p.hincrby(self.k.assign_versions, worker_id, 1)
        p.hincrby(self.k.assign_versions, ANY_WORKER, 1)

    async def assign_versions(self) -> dict[str, str]:
        """worker id -> its assignment version (the scheduler's check for others' writes)."""
        return (await self._hashes([self.k.assign_versions]))[0]

    async def intent_changes(self, after: str | None, limit: int) -> LogRead:
        """The intents counter, its log's newest id and the aliases logged after ``after``
        (demand and sleep requests since the scheduler's last tick)."""
        log = self.k.intents_log
        async with self._txn(self.k.intents_version) as pipe:
            pipe.get(self.k.intents_version)
            pipe.xrevrange(log, "+", "-", count=1)
            if after is not None:
                pipe.xrange(log, f"({after}", "+", count=limit + 1)
            replies = await pipe.execute(raise_on_error=False)
        version = self._checked(self.k.intents_version, replies[0], None)
        newest = _newest(self._checked(log, replies[1], []))
        listed = None if after is None else self._checked(log, replies[2], None)
        return LogRead(str(version or "0"), newest,
                       None if listed is None else _logged_aliases(listed))

    async def scheduler_probe(self, worker_ids: list[str]) -> SchedulerProbe:
        """How many of ``worker_ids`` are alive (one EXISTS of all their heartbeat keys: an
        integer back, whatever the pool's size), the any-worker version and the size of the
        workers index, in one round trip (on a cluster, EXISTS is split per node)."""
        if self.cluster:
            keys = [self.k.worker_alive(w) for w in worker_ids]
            alive = int(await self.r.exists(*keys)) if keys else 0
            async with self._txn(self.k.workers) as pipe:
                pipe.hget(self.k.assign_versions, ANY_WORKER)
                pipe.scard(self.k.workers)
                version, count = await pipe.execute()
            return SchedulerProbe(alive, str(version or "0"), int(count))
        if len(worker_ids) >= _PROBE_PACKED_MIN:
            alive, version, count = await self._send_packed(self._probe_packed(worker_ids), 3)
            return SchedulerProbe(int(alive), str(version or "0"), int(count))
        async with self.r.pipeline(transaction=False) as pipe:
            if worker_ids:
                pipe.exists(*(self.k.worker_alive(w) for w in worker_ids))
            pipe.hget(self.k.assign_versions, ANY_WORKER)
            pipe.scard(self.k.workers)
            replies = await pipe.execute()
        alive = int(replies[0]) if worker_ids else 0
        version, count = replies[-2:]
        return SchedulerProbe(alive, str(version or "0"), int(count))

    def _probe_packed(self, worker_ids: list[str]) -> bytes:
        """The probe's three commands, packed once while the scheduler passes the same list
        (its view of the pool, rebuilt only when workers join or leave)."""
        cached = self._probe_cache
        if cached is not None and cached[0] is worker_ids and cached[1] == len(worker_ids):
            return cached[2]
        packed = (_resp("EXISTS", *(self.k.worker_alive(w) for w in worker_ids))
                  + _resp("HGET", self.k.assign_versions, ANY_WORKER)
                  + _resp("SCARD", self.k.workers))
        self._probe_cache = (worker_ids, len(worker_ids), packed)
        return packed

    async def _send_packed(self, packed: bytes, replies: int) -> list[Any]:
        """Commands already in the protocol, on a pooled connection, and their replies; once
        more on a fresh connection if the pooled one turns out broken (as redis-py's retry
        would)."""
        pool = self.r.connection_pool
        for attempt in (1, 2):
            conn = await pool.get_connection()
            try:
                await conn.send_packed_command(packed)
                return [await conn.read_response() for _ in range(replies)]
            except (RedisConnectionError, RedisTimeoutError):
                await conn.disconnect()
                if attempt == 2:
                    raise
            except BaseException:
                await conn.disconnect()  # replies may be left unread on it
                raise
            finally:
                await pool.release(conn)
        raise AssertionError("unreachable")

    async def assignment_stamp(self, worker_id: str) -> tuple[str, str]:
        """The worker's assignment version and the models version, in one round trip (both
        in the scheduler's slot): what a worker compares before re-reading its state."""
        async with self._batch() as pipe:
            pipe.hget(self.k.assign_versions, worker_id)
            pipe.get(self.k.models_version)
            mine, models = await pipe.execute(raise_on_error=False)
        mine = self._checked(self.k.assign_versions, mine, None)
        models = self._checked(self.k.models_version, models, None)
        return str(mine or "0"), str(models or "0")

    def _add_assign(self, p: Pipeline, a: Assignment) -> None:
        self._touched(p, a.worker_id)
        p.hset(self.k.assign(a.worker_id), a.alias, a.model_dump_json())
        if a.gpus:
            r = Reservation(alias=a.alias, gpus=a.gpus, mb_per_gpu=a.mb_per_gpu, epoch=a.epoch)
            p.hset(self.k.ledger(a.worker_id), a.alias, r.model_dump_json())
        if not self.cluster:
            p.delete(self.k.placement(a.alias))

    async def _placed(self, aliases: Iterable[str]) -> None:
        """On a cluster, after the fenced write: drop the placed aliases' "could not place"
        notes, which live in their models' slots (a note that outlives its placement by a
        round trip says something stale, no more; the next pass that fails sets it again)."""
        names = sorted(set(aliases))
        if self.cluster and names:
            async with self._batch() as pipe:
                for alias in names:
                    pipe.delete(self.k.placement(alias))
                await pipe.execute()

    async def assign(self, token: str, a: Assignment) -> None:
        """Write (or update) an assignment and, for GPU instances, its ledger reservation,
        in one fenced transaction."""
        await self._fenced(token, lambda p: self._add_assign(p, a))
        await self._placed([a.alias])
        await self.publish("assign", alias=a.alias, worker=a.worker_id)

    async def unassign(self, token: str, worker_id: str, alias: str) -> None:
        def build(p: Pipeline) -> None:
            p.hdel(self.k.assign(worker_id), alias)
            self._touched(p, worker_id)

        await self._fenced(token, build)
        await self.publish("assign", alias=alias, worker=worker_id)

    async def write_fenced(self, token: str, writes: Sequence[Assignment | Unassign]) -> None:
        """Several :meth:`assign` / :meth:`unassign` writes, in order, in one fenced
        transaction: all are made, and the hint published, only if ``token`` holds the lease
        when it runs (none otherwise: :class:`NotLeader`). Three round trips in all instead
        of about four per write.

        One hint for the lot (hints only wake loops, which then read everything): it names
        the alias and the worker where all the writes share them, as :meth:`assign` does."""
        if not writes:
            return
        hint = {"kind": "assign"}
        for field in ("alias", "worker_id"):
            values = {getattr(w, field) for w in writes}
            if len(values) == 1:
                hint[field.removesuffix("_id")] = values.pop()

        def build(p: Pipeline) -> None:
            for w in writes:
                if isinstance(w, Unassign):
                    p.hdel(self.k.assign(w.worker_id), w.alias)
                    self._touched(p, w.worker_id)
                else:
                    self._add_assign(p, w)
            if self.events_enabled and not self.cluster:
                # Inside the transaction, after the writes: published exactly when they land.
                p.publish(self.k.events, orjson.dumps(hint))

        await self._fenced(token, build)
        await self._placed(w.alias for w in writes if isinstance(w, Assignment))
        if self.events_enabled and self.cluster:
            # A cluster transaction takes keyed commands only: the hint follows it.
            await self.r.publish(self.k.events, orjson.dumps(hint))

    async def forget_dead_worker(self, token: str, worker_id: str, aliases: Iterable[str]) -> None:
        """Drop a dead worker's routes, instance records and reported loads under ``aliases``
        (a load left behind stayed in ``load:{alias}`` until the alias was deleted), then its
        assignments, in steps that may each be repeated: the routes and records, the
        unlogged bump, then last the fenced delete of its assignments. The scheduler forgets
        a dead worker while it still has assignments, so a step that fails is redone whole
        by the next pass."""
        names = list(aliases)
        if self.cluster:
            await self._forget_per_alias(token, worker_id, names)
        else:
            await self._forget_in_chunks(token, worker_id, names)
        # Unlogged: routers reload every alias. Bumped as soon as routes went, before the
        # fenced step (which a lost lease may refuse).
        await self.r.eval(_BUMP_LUA, 1, self.k.routes_version)

        def build(p: Pipeline) -> None:
            p.delete(self.k.assign(worker_id))
            self._touched(p, worker_id)

        await self._fenced(token, build)
        await self.publish("route", worker=worker_id)

    async def _forget_in_chunks(self, token: str, worker_id: str, aliases: list[str]) -> None:
        """The routes and records on a single Redis: a script per ``_FORGET_CHUNK`` aliases,
        fenced by the lease. A full pass forgets a dead worker under every alias; as one
        transaction of four commands per alias that took ~0.4 s of the scheduler's time per
        dead worker at 5,000 aliases (redis-py packing and parsing 20,000 commands), during
        which no death or registration was acted on; this takes ~50 ms."""
        for start in range(0, len(aliases), _FORGET_CHUNK):
            keys: list[str] = []
            for alias in aliases[start:start + _FORGET_CHUNK]:
                keys += (self.k.routes(alias), self.k.instance(alias, worker_id),
                         self.k.instances(alias), self.k.load(alias))
            try:
                refused = await self._forget_script(keys=[self.k.lease],
                                                    args=[token, worker_id, "\n".join(keys)])
            except ResponseError as e:
                if "NOTLEADER" in str(e):
                    raise NotLeader(token) from e
                raise
            for key in refused:
                self._skip(BadRecord(key, "not of its type: left as it is"))

    async def _forget_per_alias(self, token: str, worker_id: str, aliases: list[str]) -> None:
        """The routes and records on a cluster: one script per model slot (keys of many
        slots cannot share one). The lease is checked first, so a manager that lost it stops
        there."""
        if await self.lease_holder() != token:
            raise NotLeader(token)
        async with self._batch() as pipe:
            for alias in aliases:
                pipe.eval(_FORGET_INSTANCE_LUA, 4, self.k.routes(alias),
                          self.k.instance(alias, worker_id), self.k.instances(alias),
                          self.k.load(alias), worker_id)
            await pipe.execute()

    async def ledgers(self, worker_ids: Iterable[str]) -> dict[str, dict[str, Reservation]]:
        ids = list(worker_ids)
        raws = await self._hashes([self.k.ledger(w) for w in ids])
        return {w: self._parse_ledger(w, raw) for w, raw in zip(ids, raws, strict=True)}

    def _parse_ledger(self, worker_id: str, raw: dict[str, str]) -> dict[str, Reservation]:
        key = self.k.ledger(worker_id)
        out = {}
        for alias, v in raw.items():
            try:
                out[alias] = parse_reservation(key, alias, v)
            except BadRecord as e:
                self._skip(e)
        return out

    async def worker_state(self, worker_id: str) -> tuple[dict[str, Assignment], set[str]]:
        """A worker's assignments and the aliases of its ledger, read in one snapshot (so an
        assignment and its reservation are never seen apart)."""
        async with self._txn(self.k.assign(worker_id)) as pipe:
            pipe.hgetall(self.k.assign(worker_id))
            pipe.hkeys(self.k.ledger(worker_id))
            raw, reserved = await pipe.execute(raise_on_error=False)
        raw = self._checked(self.k.assign(worker_id), raw, {})
        reserved = self._checked(self.k.ledger(worker_id), reserved, [])
        return self._parse_assigns(worker_id, raw), set(reserved)

    async def release_reservation(self, worker_id: str, alias: str) -> bool:
        """Drop a ledger entry once its engine is confirmed gone, unless the alias has been
        assigned to this worker again meanwhile (the entry then belongs to the new one)."""
        res = await self.r.eval(_RELEASE_RESERVATION_LUA, 3, self.k.assign(worker_id),
                                self.k.ledger(worker_id), self.k.assign_versions, alias,
                                worker_id)
        if res:
            # The worker's own version moved: its reader (which reads the versions on a
            # hint, else every few seconds) and the scheduler look again now.
            await self.publish("assign", alias=alias, worker=worker_id)
        return bool(res)

    async def set_placement_reason(self, alias: str, reason: str) -> None:
        await self.r.hset(self.k.placement(alias), mapping={"reason": reason, "at": time.time()})

    async def placement_reason(self, alias: str) -> str | None:
        return cast(str | None, await self.r.hget(self.k.placement(alias), "reason"))

