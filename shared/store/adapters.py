"""LoRA adapters: their registry (admin API), which worker holds which (workers), and the
counts of adapter loads and evictions, kept apart from cold starts."""

from __future__ import annotations

from typing import Literal

import orjson
from pydantic import ValidationError

from shared.errors import Conflict
from shared.models import AdapterSpec
from shared.records import BadRecord
from shared.store.base import StoreBase

# KEYS: adapters hash, models set (both in {s}: the base is checked in the index, not by its
# spec in the model's slot, so the script runs unchanged on Redis Cluster)
# ARGV: alias, base, spec JSON
_REGISTER_LUA = """
if redis.call('TYPE', KEYS[1])['ok'] ~= 'hash' and redis.call('EXISTS', KEYS[1]) == 1 then
  return 'wrongtype'
end
if redis.call('SISMEMBER', KEYS[2], ARGV[1]) == 1 then return 'is_model' end
if redis.call('SISMEMBER', KEYS[2], ARGV[2]) == 0 then return 'no_base' end
local existing = redis.call('HGET', KEYS[1], ARGV[1])
if existing then
  if existing == ARGV[3] then return 'same' end
  return 'conflict'
end
redis.call('HSET', KEYS[1], ARGV[1], ARGV[3])
return 'created'
"""

RegisterOutcome = Literal["created", "same", "no_base"]


class AdaptersStore(StoreBase):
    async def register_adapter(self, spec: AdapterSpec) -> RegisterOutcome:
        """Store ``spec`` atomically with its checks: 'no_base' when the base model is not
        registered; raises Conflict when the alias is a model or another adapter."""
        k = self.k
        reply = await self.r.eval(_REGISTER_LUA, 2, k.adapters, k.models, spec.alias, spec.base,
                                  spec.model_dump_json())
        if reply == "wrongtype":
            raise Conflict(f"Redis key {k.adapters} is not a hash; fix or delete it "
                           "(see docs/redis.md)")
        if reply == "is_model":
            raise Conflict(f"'{spec.alias}' is a registered model alias", param="alias")
        if reply == "conflict":
            raise Conflict(f"adapter '{spec.alias}' is already registered differently; "
                           "delete it first", param="alias")
        out: RegisterOutcome = reply
        return out

    def _parse_adapter(self, alias: str, raw: str) -> AdapterSpec | None:
        try:
            return AdapterSpec.model_validate(orjson.loads(raw))
        except (ValidationError, orjson.JSONDecodeError) as e:
            self._skip(BadRecord(self.k.adapters, str(e)[:200], alias))
            return None

    async def list_adapters(self) -> dict[str, AdapterSpec]:
        """Every registered adapter that parses (bad records are reported and skipped)."""
        raw = (await self._hashes([self.k.adapters]))[0]
        out = {}
        for alias, value in raw.items():
            spec = self._parse_adapter(alias, value)
            if spec is not None:
                out[alias] = spec
        return out

    async def get_adapter(self, alias: str) -> AdapterSpec | None:
        raw = await self.r.hget(self.k.adapters, alias)
        return None if raw is None else self._parse_adapter(alias, str(raw))

    async def is_adapter(self, alias: str) -> bool:
        return bool(await self.r.hexists(self.k.adapters, alias))

    async def delete_adapter(self, alias: str) -> bool:
        async with self._txn(self.k.adapters) as pipe:  # both keys in {s}
            pipe.hdel(self.k.adapters, alias)
            pipe.hdel(self.k.adapter_stats, *(f"{alias}:{f}" for f in _STAT_FIELDS))
            gone, _ = await pipe.execute()
        return bool(gone)

    async def set_lora_loaded(self, base: str, worker_id: str, names: list[str]) -> None:
        """What this worker's engine of ``base`` holds now (empty: the field goes)."""
        if names:
            await self.r.hset(self.k.lora_loaded(base), worker_id, orjson.dumps(names).decode())
        else:
            await self.r.hdel(self.k.lora_loaded(base), worker_id)

    async def lora_loaded(self, bases: list[str]) -> dict[str, dict[str, frozenset[str]]]:
        """base -> worker -> adapters its engine holds, in one round trip."""
        raws = await self._hashes([self.k.lora_loaded(b) for b in bases])
        out: dict[str, dict[str, frozenset[str]]] = {}
        for base, raw in zip(bases, raws, strict=True):
            held = out[base] = {}
            for worker, value in raw.items():
                try:
                    names = orjson.loads(value)
                except orjson.JSONDecodeError:
                    names = None
                if isinstance(names, list) and all(isinstance(n, str) for n in names):
                    held[worker] = frozenset(names)
                else:
                    self._skip(BadRecord(self.k.lora_loaded(base), "not a JSON list", worker))
        return out

    async def record_adapter_load(self, alias: str, seconds: float) -> None:
        async with self._txn(self.k.adapter_stats) as pipe:
            pipe.hincrby(self.k.adapter_stats, f"{alias}:loads", 1)
            pipe.hincrbyfloat(self.k.adapter_stats, f"{alias}:load_s", seconds)
            await pipe.execute()

    async def record_adapter_eviction(self, alias: str) -> None:
        await self.r.hincrby(self.k.adapter_stats, f"{alias}:evictions", 1)

    async def adapter_stats(self) -> dict[str, dict[str, float]]:
        """alias -> {loads, load_s, evictions}."""
        raw = (await self._hashes([self.k.adapter_stats]))[0]
        out: dict[str, dict[str, float]] = {}
        for field, value in raw.items():
            alias, _, what = field.rpartition(":")
            if what in _STAT_FIELDS:
                try:
                    out.setdefault(alias, {})[what] = float(value)
                except ValueError:
                    self._skip(BadRecord(self.k.adapter_stats, "not a number", field))
        return out


_STAT_FIELDS = ("loads", "load_s", "evictions")
