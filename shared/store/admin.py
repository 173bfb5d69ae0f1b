"""Reads for the admin API: whole-pool views in a fixed number of round trips.

``/admin/models`` used to make about five sequential round trips per model (instances,
placement reason, queue length, stats). Here two read-only Lua scripts per batch of models
gather everything inside Redis and answer one JSON document each: the models with their
holds, instance indexes, placement reasons, queue lengths and stats; then the instance
records. A pipeline of ~45,000 commands for 5,000 models spent seconds in the client
packing and parsing them; the scripts take milliseconds. Keys are still built here, from
:class:`shared.keys.Keys`, and passed in.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

import orjson
from redis.exceptions import ResponseError

from shared.models import Reservation
from shared.records import BadRecord, parse_counter
from shared.store.base import StoredModel
from shared.store.lifecycle import TIMING_KINDS, LifecycleStore
from shared.store.models import ModelsStore
from shared.store.observed import ObservedStore
from shared.store.scheduling import SchedulingStore

# Models per script call: bounds how long one call keeps Redis busy (a few ms).
BATCH = 500
_HOLE, _HOLE2 = "\x00", "\x01"

# ARGV: the number T of per-alias key templates, then each template's head and tail (the
# key is head .. alias .. tail; templates come from shared.keys, in the order model, hold,
# instances, placement, queue, stats, samples per kind), then the instance key's head, middle
# and tail (head .. alias .. middle .. worker .. tail), then the aliases. Every command goes
# through redis.pcall: a key of the wrong type answers {err = ...} for that part alone,
# which the parser reports, instead of failing the whole view. Keys are built from templates
# inside the script; every key of an alias is in the alias's hash slot ({m:<alias>}), so on
# Redis Cluster the script runs once per alias, with the model's key declared to route it.
_VIEWS_LUA = """
local t = tonumber(ARGV[1])
local function key(i, alias) return ARGV[2 * i] .. alias .. ARGV[2 * i + 1] end
local ih, im, it = ARGV[2 * t + 2], ARGV[2 * t + 3], ARGV[2 * t + 4]
local out = {}
for a = 2 * t + 5, #ARGV do
  local alias = ARGV[a]
  local members = redis.pcall('SMEMBERS', key(3, alias))
  local inst = {}
  if members.err == nil then
    for _, w in ipairs(members) do
      inst[#inst + 1] = {w, redis.pcall('HGETALL', ih .. alias .. im .. w .. it)}
    end
  end
  local one = {redis.pcall('HGETALL', key(1, alias)), redis.pcall('GET', key(2, alias)),
               members, redis.pcall('HGET', key(4, alias), 'reason'),
               redis.pcall('ZCARD', key(5, alias)), redis.pcall('HGETALL', key(6, alias))}
  for i = 7, t do one[#one + 1] = redis.pcall('LRANGE', key(i, alias), 0, -1) end
  one[#one + 1] = inst
  out[#out + 1] = one
end
return cjson.encode(out)
"""


@dataclass(frozen=True)
class ModelDetails:
    """What the admin views show of one alias, besides its spec."""

    instances: dict[str, dict[str, str]]
    placement: str | None
    waiting_requests: int
    stats: dict[str, Any]


def _pairs(flat: Any) -> dict[str, str]:
    """An HGETALL answer as cjson encodes it (a flat list; ``{}`` when empty)."""
    if not flat:
        return {}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat) - 1, 2)}


def _strings(reply: Any) -> list[str]:
    """A list answer (SMEMBERS, LRANGE; ``{}`` when empty); none when it was refused."""
    got = _ok(reply)
    return [] if isinstance(got, Exception) or not got else [str(v) for v in got]


def _ok(reply: Any) -> Any:
    """A reply, or the error Redis refused the command with (caught in the script)."""
    if isinstance(reply, dict) and "err" in reply:
        return ResponseError(str(reply["err"]))
    return reply


class AdminReads(ModelsStore, SchedulingStore, ObservedStore, LifecycleStore):
    async def model_views(self) -> list[tuple[StoredModel, ModelDetails]]:
        """Every registered model that parses, with its details, in two script calls per
        :data:`BATCH` models."""
        aliases = await self._members(self.k.models)
        out: list[tuple[StoredModel, ModelDetails]] = []
        for lo in range(0, len(aliases), BATCH):
            out += await self._views(aliases[lo:lo + BATCH])
        return out

    async def model_details(self, aliases: list[str]) -> dict[str, ModelDetails]:
        """Instances, placement reason, queue length and timings of registered ``aliases``."""
        views = []
        for lo in range(0, len(aliases), BATCH):
            views += await self._views(aliases[lo:lo + BATCH])
        return {m.spec.alias: d for m, d in views}

    def _templates(self) -> list[str]:
        k, h = self.k, _HOLE
        heads_tails = [part for key in (
            k.model(h), k.hold(h), k.instances(h), k.placement(h), k.queue(h), k.stats(h),
            *(k.samples(h, kind) for kind in TIMING_KINDS)) for part in key.split(h)]
        inst = k.instance(h, _HOLE2).replace(h, _HOLE2).split(_HOLE2)
        return [str(len(heads_tails) // 2), *heads_tails, *inst]

    async def _views(self, aliases: list[str]) -> list[tuple[StoredModel, ModelDetails]]:
        if not aliases:
            return []
        parts = await self._view_parts(aliases)
        out = []
        for a, p in zip(aliases, parts, strict=True):
            model = self._view_model(a, p)
            if model is not None:
                out.append((model, self._details(a, p, self._instances(a, p[-1]))))
        return out

    async def _view_parts(self, aliases: list[str]) -> list[Any]:
        """The script's answer for each of ``aliases``: one call on a single Redis; on a
        cluster, one call per alias (in one pipeline, which the client splits by node)."""
        templates = self._templates()
        if not self.cluster:
            return cast(list[Any], orjson.loads(
                await self.r.eval(_VIEWS_LUA, 0, *templates, *aliases)))
        async with self._batch() as pipe:
            for a in aliases:
                pipe.eval(_VIEWS_LUA, 1, self.k.model(a), *templates, a)
            replies = await pipe.execute()
        return [orjson.loads(r)[0] for r in replies]

    def _instances(self, alias: str, found: Any) -> dict[str, dict[str, str]]:
        out = {}
        for w, raw in found or []:
            rec = self._checked(self.k.instance(alias, str(w)), _ok(raw), [])
            if rec and self._instance_ok(alias, str(w), _pairs(rec)):
                out[str(w)] = _pairs(rec)
        return out

    def _view_model(self, alias: str, p: list[Any]) -> StoredModel | None:
        raw = _ok(p[0])
        hold = _ok(p[1])
        try:
            return self._parse_model(alias, raw if isinstance(raw, Exception) else _pairs(raw),
                                     hold if hold is not False else None)
        except BadRecord as e:
            self._skip(e)
            return None

    def _details(self, alias: str, p: list[Any], instances: dict[str, dict[str, str]]
                 ) -> ModelDetails:
        k = self.k
        if isinstance(_ok(p[2]), Exception):
            self._skip(BadRecord(k.instances(alias), str(_ok(p[2]))))
        reason = self._checked(k.placement(alias), _ok(p[3]), None)
        stats = _pairs(self._checked(k.stats(alias), _ok(p[5]), []))
        samples = [_strings(self._checked(k.samples(alias, kind), _ok(s), []))
                   for kind, s in zip(TIMING_KINDS, p[6:-1], strict=True)]
        return ModelDetails(
            instances=instances,
            placement=reason if isinstance(reason, str) else None,
            waiting_requests=int(self._checked(k.queue(alias), _ok(p[4]), 0)),
            stats=self._timings(alias, stats, samples))

    async def check_records(self, worker_ids: Iterable[str]
                            ) -> dict[str, dict[str, Reservation]]:
        """Read what the status view does not show (assignments, ledgers, version counters)
        so that their bad records are reported too; returns the ledgers it read."""
        ids = list(worker_ids)
        await self.assignments(ids)
        ledgers = await self.ledgers(ids)
        counters = [self.k.models_version, self.k.routes_version]
        for key, raw in zip(counters, await self.r.mget(counters), strict=True):
            try:
                parse_counter(key, cast(str | None, raw))
            except BadRecord as e:
                self._skip(e)
        return ledgers
