"""Desired state: model specs, written by the admin API.

Registration and deletion are Lua scripts: a MULTI/EXEC does not roll back a command that
fails at run time, so a key of the wrong type (say ``svllm:models`` made a string) used to
leave half a registration behind (the model hash without its set entry). The scripts check
every key's type before writing anything.
"""

from __future__ import annotations

import time
from typing import cast

import orjson

from shared.errors import Conflict, StoreCorrupt, is_data_error
from shared.models import ModelSpec
from shared.records import BadRecord, parse_created_at, parse_model_spec
from shared.store.base import (
    LOG_CHANGE_FN_LUA,
    ROUTES_LOG_MAXLEN,
    StoreBase,
    StoredModel,
    spec_fingerprint,
)

# KEYS: model, models, hold, placement, models version, models log
# ARGV: alias, fingerprint, spec, model_name, engine, version, created_at, log maxlen,
#       events channel and hint ('' for none: events off)
_REGISTER_LUA = LOG_CHANGE_FN_LUA + """
local function kind(k) return redis.call('TYPE', k)['ok'] end
for _, c in ipairs({{1, 'hash'}, {2, 'set'}}) do
  local t = kind(KEYS[c[1]])
  if t ~= c[2] and t ~= 'none' then return {'wrongtype', KEYS[c[1]], t} end
end
local existing = redis.call('HGET', KEYS[1], 'fingerprint')
if existing and existing ~= ARGV[2] then return {'conflict'} end
if existing and redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return {'same'} end
redis.call('HSET', KEYS[1], 'spec', ARGV[3], 'model_name', ARGV[4], 'engine', ARGV[5],
           'fingerprint', ARGV[2], 'version', ARGV[6], 'created_at', ARGV[7])
redis.call('SADD', KEYS[2], ARGV[1])
redis.call('DEL', KEYS[3], KEYS[4])
log_change(KEYS[5], KEYS[6], ARGV[1], ARGV[8])
if ARGV[10] ~= '' then redis.call('PUBLISH', ARGV[9], ARGV[10]) end
return {'created'}
"""

# KEYS: model, models, models version, models log, routes version, routes log, then the keys
# deleted outright (ARGV[3] of them), then the hashes the alias is a field of.
# ARGV: alias, log maxlen, number of keys to delete, events channel and hint ('' for none)
_DELETE_LUA = LOG_CHANGE_FN_LUA + """
local function kind(k) return redis.call('TYPE', k)['ok'] end
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
local t = kind(KEYS[2])
if t ~= 'set' and t ~= 'none' then return {'wrongtype', KEYS[2], t} end
local ndel = tonumber(ARGV[3])
redis.call('DEL', KEYS[1])
redis.call('SREM', KEYS[2], ARGV[1])
for i = 7, 6 + ndel do redis.call('DEL', KEYS[i]) end
for i = 7 + ndel, #KEYS do
  -- an assign hash of the wrong type is a bad record of its own, reported by its readers
  if kind(KEYS[i]) == 'hash' then redis.call('HDEL', KEYS[i], ARGV[1]) end
end
log_change(KEYS[3], KEYS[4], ARGV[1], ARGV[2])
log_change(KEYS[5], KEYS[6], ARGV[1], ARGV[2])
if ARGV[5] ~= '' then redis.call('PUBLISH', ARGV[4], ARGV[5]) end
return 1
"""


# Redis Cluster: registration and deletion in their two slots (see docs/redis.md).
# The index's type and whether it lists the alias. KEYS: models. ARGV: alias.
_LISTED_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'set' and t ~= 'none' then return {'wrongtype', KEYS[1], t} end
return {'ok', redis.call('SISMEMBER', KEYS[1], ARGV[1])}
"""
# The model's slot. KEYS: model, hold, placement. ARGV: fingerprint, spec, model_name, engine,
# version, created_at. 'exists': the same spec is there already (left as it is).
_REGISTER_SPEC_LUA = """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'hash' and t ~= 'none' then return {'wrongtype', KEYS[1], t} end
local existing = redis.call('HGET', KEYS[1], 'fingerprint')
if existing and existing ~= ARGV[1] then return {'conflict'} end
if existing then return {'exists'} end
redis.call('HSET', KEYS[1], 'spec', ARGV[2], 'model_name', ARGV[3], 'engine', ARGV[4],
           'fingerprint', ARGV[1], 'version', ARGV[5], 'created_at', ARGV[6])
redis.call('DEL', KEYS[2], KEYS[3])
return {'created'}
"""
# The scheduler's slot, after the spec is written. KEYS: models, models version, models log.
# ARGV: alias, log maxlen, events channel and hint ('' for none), '1' when the spec was there
# already ('same' if it is listed too; else this finishes an interrupted registration).
_LIST_LUA = LOG_CHANGE_FN_LUA + """
local t = redis.call('TYPE', KEYS[1])['ok']
if t ~= 'set' and t ~= 'none' then return {'wrongtype', KEYS[1], t} end
if redis.call('SADD', KEYS[1], ARGV[1]) == 0 and ARGV[5] == '1' then return {'same'} end
log_change(KEYS[2], KEYS[3], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return {'created'}
"""
# The model's slot. KEYS: model, then the alias's other keys. 0 when there is no model.
_DELETE_SPEC_LUA = """
if redis.call('EXISTS', KEYS[1]) == 0 then return 0 end
for i = 1, #KEYS do redis.call('DEL', KEYS[i]) end
return 1
"""
# The scheduler's slot, after the model's keys are gone. KEYS: models, models version, models
# log, routes version, routes log, then the hashes the alias is a field of.
# ARGV: alias, log maxlen, events channel and hint ('' for none).
_UNLIST_LUA = LOG_CHANGE_FN_LUA + """
redis.call('SREM', KEYS[1], ARGV[1])
for i = 6, #KEYS do
  if redis.call('TYPE', KEYS[i])['ok'] == 'hash' then redis.call('HDEL', KEYS[i], ARGV[1]) end
end
log_change(KEYS[2], KEYS[3], ARGV[1], ARGV[2])
log_change(KEYS[4], KEYS[5], ARGV[1], ARGV[2])
if ARGV[4] ~= '' then redis.call('PUBLISH', ARGV[3], ARGV[4]) end
return 1
"""


def _wrong_type(reply: list[str]) -> StoreCorrupt:
    return StoreCorrupt(f"Redis key {reply[1]} is a {reply[2]}, not what the pool keeps there; "
                        "fix or delete it (see docs/redis.md)")


_SPEC_CACHE_MAX = 100_000


class ModelsStore(StoreBase):
    def _hint(self, alias: str) -> tuple[str, str]:
        """(channel, message) of a model change's hint, published by the script that makes
        the change (one round trip, not two); an empty message when events are off."""
        msg = orjson.dumps({"kind": "model", "alias": alias}).decode()
        return self.k.events, msg if self.events_enabled else ""

    async def register_model(self, spec: ModelSpec) -> bool:
        """Store ``spec``; True if new, False if the same spec was already there.

        Raises :class:`Conflict` when the alias exists with a different spec, and
        :class:`StoreCorrupt` (writing nothing) when a key it writes has the wrong type.
        """
        return await self.register(spec) is not None

    async def register(self, spec: ModelSpec) -> StoredModel | None:
        """:meth:`register_model`, answering the model as stored when it is new (None when
        the same spec was already there), in one round trip."""
        fp = spec_fingerprint(spec)
        now = time.time()
        version = f"{fp[:12]}-{now:.6f}"
        k = self.k
        if self.cluster:
            reply = await self._register_in_steps(spec, fp, version, now)
        else:
            reply = await self.r.eval(
                _REGISTER_LUA, 6, k.model(spec.alias), k.models, k.hold(spec.alias),
                k.placement(spec.alias), k.models_version, k.models_log,
                spec.alias, fp, spec.model_dump_json(), spec.model_name, spec.engine,
                version, repr(now), ROUTES_LOG_MAXLEN, *self._hint(spec.alias))
        if reply[0] == "wrongtype":
            raise _wrong_type(reply)
        if reply[0] == "conflict":
            raise Conflict(f"model '{spec.alias}' is already registered with a different "
                           "spec; delete it first", param="alias")
        if reply[0] == "same":
            return None
        return StoredModel(spec=spec, version=version, created_at=now,
                           spec_json=spec.model_dump_json())

    async def _register_in_steps(self, spec: ModelSpec, fp: str, version: str, now: float
                                 ) -> list[str]:
        """:meth:`register` on a cluster: the spec written (in the model's slot; kept as it
        is when the same spec is there), then the alias listed and the change logged (in the
        scheduler's), so a router that sees the log entry finds the spec. Interrupted after
        the spec, it leaves an unlisted spec that nothing serves: registering the same spec
        again lists it, and deleting the alias removes it. Unlike on a single Redis, an
        index of the wrong type is found only after the spec is written (which it leaves
        unlisted, as an interruption would)."""
        k = self.k
        reply = await self.r.eval(
            _REGISTER_SPEC_LUA, 3, k.model(spec.alias), k.hold(spec.alias),
            k.placement(spec.alias), fp, spec.model_dump_json(), spec.model_name, spec.engine,
            version, repr(now))
        if reply[0] not in ("created", "exists"):
            return cast(list[str], reply)
        return cast(list[str], await self.r.eval(
            _LIST_LUA, 3, k.models, k.models_version, k.models_log, spec.alias,
            ROUTES_LOG_MAXLEN, *self._hint(spec.alias), "1" if reply[0] == "exists" else "0"))

    def _parse_model(self, alias: str, raw: dict[str, str] | Exception,
                     hold: str | Exception | None) -> StoredModel | None:
        """The model; None when there is no record; :class:`BadRecord` when it does not
        parse (a bad hold reads as none, reported)."""
        key = self.k.model(alias)
        if isinstance(raw, Exception):
            if not is_data_error(raw):
                raise raw  # Redis's health, not the record: never read as a bad record
            raise BadRecord(key, str(raw))
        held: str | None = self._checked(self.k.hold(alias), hold, None)
        if not raw:
            return None
        if not raw.get("spec"):
            raise BadRecord(key, "missing", "spec")
        return StoredModel(spec=self._spec(key, alias, raw["spec"]),
                           version=raw.get("version", ""),
                           created_at=parse_created_at(key, raw), hold=held,
                           spec_json=raw["spec"])

    def _spec(self, key: str, alias: str, raw: str) -> ModelSpec:
        """The parsed spec, reused while its JSON is unchanged: every scheduler pass and
        admin view reads every model, and validating thousands of specs each time cost
        most of a view. Specs are treated as read-only everywhere (copied to change)."""
        hit = self._specs.get(alias)
        if hit is not None and hit[0] == raw:
            return hit[1]
        spec = parse_model_spec(key, alias, raw)
        if len(self._specs) >= _SPEC_CACHE_MAX:
            self._specs.clear()
        self._specs[alias] = (raw, spec)
        return spec

    async def get_model(self, alias: str) -> StoredModel | None:
        """The model, or None when it is not registered or its record does not parse."""
        return (await self.get_models([alias])).get(alias)

    async def get_models(self, aliases: list[str]) -> dict[str, StoredModel]:
        """The registered ones among ``aliases``, in one round trip."""
        return (await self.get_models_checked(aliases))[0]

    async def get_models_checked(self, aliases: list[str]
                                 ) -> tuple[dict[str, StoredModel], set[str]]:
        """The registered ones among ``aliases``, and the aliases whose record does not
        parse (reported): callers leave those as they are, neither placed nor stopped, since
        a corrupt record says nothing about what the operator wants."""
        flat = await self._reads([key for a in aliases
                                  for key in (self.k.model(a), self.k.hold(a))],
                                 ("HGETALL", "GET"))
        out, bad = {}, set()
        for i, a in enumerate(aliases):
            try:
                m = self._parse_model(a, flat[2 * i], flat[2 * i + 1])
            except BadRecord as e:
                self._skip(e)
                bad.add(a)
                continue
            if m is not None:
                out[a] = m
        return out, bad

    async def list_models(self) -> list[StoredModel]:
        return (await self.list_models_checked())[0]

    async def list_models_checked(self) -> tuple[list[StoredModel], set[str]]:
        """Every registered model that parses, and the aliases of those that do not."""
        models, bad = await self.get_models_checked(await self._members(self.k.models))
        return list(models.values()), bad

    async def delete_model(self, alias: str) -> bool:
        """Remove the alias, its routes, its operators' requests, every assignment and every
        instance record of it (FAILED ones of dead workers included, which nobody else would
        clean up), in one script. False if unknown (no model hash: a hash with a bad spec can
        still be deleted)."""
        workers = await self._members(self.k.workers)
        k = self.k
        gone = [k.hold(alias), k.placement(alias), k.routes(alias), k.demand(alias),
                k.queue(alias), k.stats(alias), k.samples(alias, "cold_start"),
                k.samples(alias, "wake"), k.load(alias), k.manual(alias), k.intent(alias),
                k.instances(alias), k.prefetch_status(alias), k.lora_loaded(alias),
                *(k.instance(alias, w) for w in workers)]
        # Hashes the alias is a field of: every worker's assignments, the autoscaler's clocks.
        fields_of = [k.assign(w) for w in workers] + [k.prefetch(w) for w in workers] + [
            k.autoscale]
        if self.cluster:
            return await self._delete_in_steps(alias, gone, fields_of)
        reply = await self.r.eval(
            _DELETE_LUA, 6 + len(gone) + len(fields_of), k.model(alias), k.models,
            k.models_version, k.models_log, k.routes_version, k.routes_log, *gone, *fields_of,
            alias, ROUTES_LOG_MAXLEN, len(gone), *self._hint(alias))
        if isinstance(reply, list):
            raise _wrong_type(reply)
        return bool(reply)

    async def _delete_in_steps(self, alias: str, gone: list[str], fields_of: list[str]) -> bool:
        """:meth:`delete_model` on a cluster: the index's type is checked, the model's keys
        deleted (its slot), then the alias unlisted, unassigned everywhere and both changes
        logged (the scheduler's slot). Interrupted in between, the alias stays listed with
        no spec: routers and the scheduler read it as gone (no model), and deleting it again
        finishes the job (the unlisting step runs whenever the index still lists it)."""
        k = self.k
        listed = await self.r.eval(_LISTED_LUA, 1, k.models, alias)
        if listed[0] != "ok":
            raise _wrong_type(listed)
        deleted = await self.r.eval(_DELETE_SPEC_LUA, 1 + len(gone), k.model(alias), *gone)
        if not deleted and not listed[1]:
            return False
        await self.r.eval(
            _UNLIST_LUA, 5 + len(fields_of), k.models, k.models_version, k.models_log,
            k.routes_version, k.routes_log, *fields_of, alias, ROUTES_LOG_MAXLEN,
            *self._hint(alias))
        return bool(deleted)
