"""API keys, tenant limits, the rate limiter's script and usage counters (docs/keys.md)."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, cast

from redis.asyncio.client import Pipeline
from redis.exceptions import NoScriptError, WatchError

from shared.apikeys import KeyRecord
from shared.errors import Conflict
from shared.keys import ROUTER_SEEN_TTL_S, USAGE_TTL_S
from shared.records import BadRecord
from shared.store.base import StoreBase

logger = logging.getLogger(__name__)

# GCRA over any number of buckets, all or nothing. Per bucket (KEYS[i]): ARGV interval
# (microseconds per unit), tolerance tau (microseconds) and cost (units). A bucket admits
# while its theoretical arrival time (TAT) is at most tau ahead of now; an admission moves
# every bucket's TAT by cost * interval. Checking before charging lets one request of any
# size through an idle bucket (a reservation larger than the burst is not refused forever),
# so a token bucket overshoots by at most one request's reservation. Redis's clock is the
# only clock: routers' clocks never matter. Answer: {admitted (1/0), retry (us), then per
# bucket the TAT minus now after the decision (us)}.
#
# A lease (docs/keys.md), when more ARGV follow: the requests and the tokens wanted beyond
# this request, then per bucket its kind (1: requests, 2: tokens). Once admitted, each kind
# is granted what every bucket of that kind still admits at once (at most what is wanted),
# each bucket is charged for it, and the answer ends with {requests, tokens granted}.
# Granted units were admissible now, so the GCRA bound holds for them as for requests.
LIMIT_LUA = """
local n = #KEYS
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tats = {}
local retry = 0
for i = 1, n do
  local tat = tonumber(redis.call('GET', KEYS[i]) or '0') or 0
  if tat < now then tat = now end
  tats[i] = tat
  local over = tat - now - tonumber(ARGV[3 * i - 1])
  if over > retry then retry = over end
end
local out = {0, math.ceil(retry)}
if retry > 0 then
  for i = 1, n do out[#out + 1] = math.floor(tats[i] - now) end
  if #ARGV > 3 * n then out[#out + 1] = 0; out[#out + 1] = 0 end
  return out
end
out[1] = 1
local lease = #ARGV > 3 * n
local want = {tonumber(ARGV[3 * n + 1] or '0'), tonumber(ARGV[3 * n + 2] or '0')}
for i = 1, n do
  tats[i] = tats[i] + tonumber(ARGV[3 * i]) * tonumber(ARGV[3 * i - 2])
  if lease then
    local kind = tonumber(ARGV[3 * n + 2 + i])
    local room = math.floor((tonumber(ARGV[3 * i - 1]) - (tats[i] - now))
                            / tonumber(ARGV[3 * i - 2])) + 1
    if room < 0 then room = 0 end
    if room < want[kind] then want[kind] = room end
  end
end
for i = 1, n do
  local new = tats[i]
  if lease then
    local kind = tonumber(ARGV[3 * n + 2 + i])
    new = new + want[kind] * tonumber(ARGV[3 * i - 2])
  end
  redis.call('SET', KEYS[i], string.format('%.1f', new), 'PX',
             math.floor((new - now) / 1000) + 60000)
  out[#out + 1] = math.floor(new - now)
end
if lease then out[#out + 1] = want[1]; out[#out + 1] = want[2] end
return out
"""

# One router's batch for one tenant, applied once and in order: token corrections
# (microseconds, + for debt, - for a refund) to bucket TATs, then usage increments. Each
# router (its boot) numbers its batches per tenant 1, 2, 3...; the last applied number is
# kept in the tenant's slot (``flushed``). A batch at or below it was applied already (sent
# again after a lost reply: a timeout that redis-py retries, or the router's resend of what
# it could not confirm): skipped, so nothing is counted or charged twice. The router also
# sends the number of its last batch confirmed (``base``): a batch one past the greater of
# the two is applied, one further on refused (an earlier one of the same flush failed) and
# sent again after it. So a Redis that lost its newest writes (a crash of an append-only
# file's last second, a failover to a replica behind) or all of them, or a kept number
# that expired, never holds a router's batches back.
# A correction moves the TAT as an admission would, from max(TAT, now), and its expiry with
# it (INCRBYFLOAT kept the reservation's expiry: a debt past it vanished with the key, and
# on a key already expired it left the bare delta with no expiry). Every key is touched
# through pcall: one of the wrong type is skipped and counted (returned), never aborting a
# batch half-applied; a counter of the wrong type is replaced.
# KEYS: flushed, nc bucket keys, usage keys. ARGV: seq, base, usage TTL, nc, nc deltas,
# then per usage key: its number of fields, then field, increment pairs.
FLUSH_LUA = """
local raw = redis.pcall('GET', KEYS[1])
if type(raw) == 'table' and raw.err then
  redis.call('DEL', KEYS[1])
  raw = false
end
local last = tonumber(raw or '0') or 0
local seq = tonumber(ARGV[1])
if seq <= last then return -1 end
local base = tonumber(ARGV[2])
if base < last then base = last end
if seq > base + 1 then
  return redis.error_reply('OUTOFORDER batch ' .. seq .. ' after ' .. base)
end
redis.call('SET', KEYS[1], ARGV[1], 'EX', 86400)
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local refused = 0
local nc = tonumber(ARGV[4])
for i = 1, nc do
  local key = KEYS[1 + i]
  local got = redis.pcall('GET', key)
  if type(got) == 'table' and got.err then
    refused = refused + 1
  else
    local tat = tonumber(got or '0') or 0
    if tat < now then tat = now end
    local new = tat + tonumber(ARGV[4 + i])
    if new <= now then
      redis.call('DEL', key)
    else
      redis.call('SET', key, string.format('%.1f', new), 'PX',
                 math.floor((new - now) / 1000) + 60000)
    end
  end
end
local a = 5 + nc
for k = 2 + nc, #KEYS do
  local n = tonumber(ARGV[a])
  a = a + 1
  for _ = 1, n do
    local r = redis.pcall('HINCRBY', KEYS[k], ARGV[a], ARGV[a + 1])
    if type(r) == 'table' and r.err then refused = refused + 1 end
    a = a + 2
  end
  redis.pcall('EXPIRE', KEYS[k], ARGV[3])
end
return refused
"""
# Entries (corrections and usage fields) per batch: bounds how long one script call keeps
# Redis busy (a router's counts after a long outage go in several, in order).
FLUSH_BATCH_MAX = 2000


@dataclass(frozen=True)
class FlushBatch:
    """What one router flushes for one tenant in one script call (Store.flush)."""

    tenant: str
    seq: int  # 1, 2, 3... per router and tenant: applied in that order, each once
    corrections: dict[str, float]  # bucket key -> microseconds to add to its TAT
    usage: dict[int, dict[str, int]]  # hour -> usage field -> increment


# Usage counters read back at most this many hours per request (a month).
USAGE_MAX_HOURS = 31 * 24
# Attempts of an optimistic update of a key before it gives up with a 409.
_WATCH_TRIES = 16
COUNTERS = ("requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")


@dataclass(frozen=True)
class Decision:
    admitted: bool
    retry_us: int
    ahead_us: list[int]  # per bucket: its TAT minus now, after the decision
    leased: tuple[int, int] = (0, 0)  # requests and tokens granted beyond this request


def _decision(reply: Any, keys: int) -> Decision:
    values = [int(x) for x in reply]
    leased = (values[2 + keys], values[3 + keys]) if len(values) > 2 + keys else (0, 0)
    return Decision(values[0] == 1, values[1], values[2:2 + keys], leased)


class ApiKeysStore(StoreBase):

    # ------------------------------------------------------------------ keys
    async def save_key(self, rec: KeyRecord) -> None:
        """Write a new key and bump the keys version, in one transaction.

        On a cluster the tenant's hash and the index (``{s}``) are in two slots: the index
        entry and the tenant's listing first, then the record, then the bump, so every key a
        router can load is found by its id. Interrupted after the index, the id names no
        record (read as no key); after the record, routers load it at the next bump (the
        caller got an error and has no secret of it)."""
        hkey = self.k.api_keys(rec.tenant)
        if self.cluster:
            async with self._txn(self.k.key_index) as pipe:
                pipe.hset(self.k.key_index, rec.key_id, rec.tenant)
                pipe.sadd(self.k.tenants, rec.tenant)
                await pipe.execute()
        async with self._txn(hkey) as pipe:
            # No WATCH: the id is new, so no other write can conflict with this one.
            pipe.hset(hkey, rec.key_id, rec.to_json())
            if not self.cluster:
                pipe.hset(self.k.key_index, rec.key_id, rec.tenant)
                pipe.sadd(self.k.tenants, rec.tenant)
                pipe.incr(self.k.keys_version)
            await pipe.execute()
        await self._keys_changed()

    async def update_key(self, tenant: str, key_id: str,
                         change: Callable[[KeyRecord], None]) -> KeyRecord | None:
        """Read the key, ``change`` it and write it back in one optimistic transaction, redone
        when another write to the tenant's keys landed in between (so a rotation and an edit
        at once both hold: the edit never writes back the secret the rotation replaced).
        None when the key is gone (revoked meanwhile)."""
        hkey = self.k.api_keys(tenant)
        for _ in range(_WATCH_TRIES):
            async with self._txn(hkey) as pipe:
                try:
                    await pipe.watch(hkey)
                    raw = cast(str | None, await pipe.hget(hkey, key_id))
                    rec = self._parse_key(hkey, raw) if raw is not None else None
                    if rec is None:
                        return None
                    change(rec)
                    pipe.multi()
                    pipe.hset(hkey, key_id, rec.to_json())
                    if not self.cluster:
                        pipe.incr(self.k.keys_version)
                    await pipe.execute()
                except WatchError:
                    continue
            await self._keys_changed()
            return rec
        raise Conflict(f"API key '{key_id}' kept changing under this update; retry it")

    async def _keys_changed(self) -> None:
        if self.cluster:  # the version is in {s}, apart from the tenant's slot
            await self.r.incr(self.k.keys_version)
        await self.publish("keys")

    async def get_key(self, key_id: str) -> KeyRecord | None:
        tenant = cast(str | None, await self.r.hget(self.k.key_index, key_id))
        if tenant is None:
            return None
        raw = cast(str | None, await self.r.hget(self.k.api_keys(tenant), key_id))
        return self._parse_key(self.k.api_keys(tenant), raw) if raw else None

    async def delete_key(self, rec: KeyRecord) -> bool:
        """Remove the key's record, its index entry, and bump the keys version, in one
        transaction. On a cluster the record goes first (its tenant's slot), then the index
        entry and the bump (``{s}``): interrupted in between, the id names no record (read
        as no key, so revoking it again answers 404) and the key is revoked all the same."""
        hkey = self.k.api_keys(rec.tenant)
        if self.cluster:
            removed = await self.r.hdel(hkey, rec.key_id)
            async with self._txn(self.k.key_index) as pipe:
                pipe.hdel(self.k.key_index, rec.key_id)
                pipe.incr(self.k.keys_version)
                await pipe.execute()
        else:
            async with self._txn(hkey) as pipe:
                pipe.hdel(hkey, rec.key_id)
                pipe.hdel(self.k.key_index, rec.key_id)
                pipe.incr(self.k.keys_version)
                removed, _, _ = await pipe.execute()
        await self.publish("keys")
        return bool(removed)

    def _parse_key(self, hkey: str, raw: str) -> KeyRecord | None:
        try:
            return KeyRecord.from_json(raw)
        except (ValueError, TypeError) as e:
            self._skip(BadRecord(hkey, f"key record does not parse: {e}"))
            return None

    async def keys_version(self) -> int:
        raw = cast(str | None, await self.r.get(self.k.keys_version))
        return int(raw) if raw and raw.lstrip("-").isdigit() else 0

    async def all_keys(self) -> tuple[list[KeyRecord], dict[str, dict[str, int]], int]:
        """Every key, every tenant's limits and the number of tenants ever given a key or a
        limit (two round trips)."""
        tenants = await self._members(self.k.tenants)
        async with self._batch() as pipe:
            for t in tenants:
                pipe.hgetall(self.k.api_keys(t))
                pipe.hgetall(self.k.tenant_limits(t))
            replies = await pipe.execute(raise_on_error=False)
        keys: list[KeyRecord] = []
        limits: dict[str, dict[str, int]] = {}
        for i, t in enumerate(tenants):
            hkey = self.k.api_keys(t)
            for raw in cast(dict[str, str], self._checked(hkey, replies[2 * i], {})).values():
                rec = self._parse_key(hkey, raw)
                if rec is not None:
                    keys.append(rec)
            lim = cast(dict[str, str], self._checked(self.k.tenant_limits(t),
                                                     replies[2 * i + 1], {}))
            parsed = {k: int(v) for k, v in lim.items() if k in ("rpm", "tpm") and v.isdigit()}
            if parsed:
                limits[t] = parsed
        return keys, limits, len(tenants)

    async def set_tenant_limits(self, tenant: str, limits: dict[str, int | None]) -> None:
        """Set (None: remove) the tenant's limits, list the tenant and bump the keys version,
        in one transaction. On a cluster the limits are written first (the tenant's slot),
        then the tenant listed and the version bumped (``{s}``): interrupted in between,
        routers apply the limits at the next bump."""
        key = self.k.tenant_limits(tenant)
        async with self._txn(key) as pipe:
            gone = [k for k, v in limits.items() if v is None]
            if gone:
                pipe.hdel(key, *gone)
            kept = {k: v for k, v in limits.items() if v is not None}
            if kept:
                pipe.hset(key, mapping=cast(Any, kept))
            if not self.cluster:
                self._list_tenant(pipe, tenant)
            await pipe.execute()
        if self.cluster:
            async with self._txn(self.k.tenants) as pipe:
                self._list_tenant(pipe, tenant)
                await pipe.execute()
        await self.publish("keys")

    def _list_tenant(self, pipe: Pipeline, tenant: str) -> None:
        pipe.sadd(self.k.tenants, tenant)
        pipe.incr(self.k.keys_version)

    async def check_in(self, router_id: str) -> tuple[int, int]:
        """(keys version, live routers), and this router counted among them: one round trip,
        the routers' periodic safety-net check."""
        now = time.time()
        async with self._batch() as pipe:
            pipe.get(self.k.keys_version)
            pipe.zadd(self.k.routers, {router_id: now})
            pipe.zremrangebyscore(self.k.routers, 0, now - ROUTER_SEEN_TTL_S)
            pipe.zcard(self.k.routers)
            raw, _, _, live = await pipe.execute()
        version = int(raw) if raw and str(raw).lstrip("-").isdigit() else 0
        return version, max(1, int(live))

    # ------------------------------------------------------------------ limits
    async def limit(self, keys: Sequence[str], args: Sequence[float]) -> Decision:
        """One admission decision (and a lease, when ``args`` ends with the units wanted):
        one EVALSHA (plus a one-off SCRIPT LOAD per connection to a Redis that lost its
        scripts)."""
        sha = self._shas.get(LIMIT_LUA) or await self._load(LIMIT_LUA)
        try:
            reply = await self.r.evalsha(sha, len(keys), *keys, *args)
        except NoScriptError:
            reply = await self.r.evalsha(await self._load(LIMIT_LUA), len(keys), *keys, *args)
        return _decision(reply, len(keys))

    async def limit_many(self, calls: Sequence[tuple[Sequence[str], Sequence[float]]]
                         ) -> list[Decision]:
        """Several decisions (of requests that arrived together) in one round trip: a
        pipeline of one EVALSHA each, so every script still touches one tenant's slot."""
        if len(calls) == 1:
            return [await self.limit(*calls[0])]
        replies = await self._scripts(LIMIT_LUA, calls)
        out = []
        for r, (keys, _) in zip(replies, calls, strict=True):
            if isinstance(r, Exception):
                raise r
            out.append(_decision(r, len(keys)))
        return out

    async def _scripts(self, script: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
                       ) -> list[Any]:
        """One EVALSHA of ``script`` per call, in one pipeline (errors as replies). A Redis
        that lost its scripts answers NOSCRIPT, and nothing of those calls ran: the script
        is loaded and they are sent again."""
        sha = self._shas.get(script) or await self._load(script)
        replies = await self._evalshas(sha, calls)
        missing = [i for i, r in enumerate(replies) if isinstance(r, NoScriptError)]
        if missing:
            sha = await self._load(script)
            for i, r in zip(missing, await self._evalshas(sha, [calls[i] for i in missing]),
                            strict=True):
                replies[i] = r
        return replies

    async def _load(self, script: str) -> str:
        sha = self._shas[script] = str(await self.r.script_load(script))
        return sha

    async def _evalshas(self, sha: str, calls: Sequence[tuple[Sequence[str], Sequence[Any]]]
                        ) -> list[Any]:
        async with self._batch() as pipe:
            for keys, args in calls:
                pipe.evalsha(sha, len(keys), *keys, *args)
            return list(await pipe.execute(raise_on_error=False))

    async def flush(self, writer: str, batches: Sequence[FlushBatch],
                    confirmed: Mapping[str, int] | None = None) -> list[bool]:
        """Token corrections and usage increments, one script call per batch, all in one
        pipeline (one round trip per flush), each applied once and in order per
        ``writer`` and tenant (FLUSH_LUA). Per batch: True when it is applied (now or
        before); False when it may not be (the caller sends it again, unchanged, and none
        of that tenant's after it). ``confirmed``: tenant -> the number of ``writer``'s last
        batch it saw applied. Raises when the round trip failed (none confirmed)."""
        done = confirmed or {}
        replies = await self._scripts(FLUSH_LUA, [
            self._flush_call(writer, b, done.get(b.tenant, 0)) for b in batches])
        out = []
        for b, reply in zip(batches, replies, strict=True):
            if isinstance(reply, Exception):
                out.append(False)
                if not str(reply).startswith("OUTOFORDER"):
                    logger.debug("flush of %s failed: %s", b.tenant, reply)
                continue
            out.append(True)
            if isinstance(reply, int) and reply > 0:
                # Named by the tenant's flush key: the refused ones may be buckets or usage
                # counts of any hour in the batch.
                self._skip(BadRecord(self.k.flushed(b.tenant, writer),
                                     f"{reply} token corrections or usage increments of "
                                     f"tenant {b.tenant} refused (a key of the wrong type "
                                     "or a count that is not a number)"))
        return out

    def _flush_call(self, writer: str, b: FlushBatch, base: int
                    ) -> tuple[list[str], list[Any]]:
        usage_keys = [self.k.usage(b.tenant, h) for h in b.usage]
        args: list[Any] = [b.seq, base, USAGE_TTL_S, len(b.corrections),
                           *b.corrections.values()]
        for fields in b.usage.values():
            args.append(len(fields))
            for f, n in fields.items():
                args += [f, n]
        return [self.k.flushed(b.tenant, writer), *b.corrections, *usage_keys], args

    async def usage_rows(self, tenants: Iterable[str], hours: list[int]
                         ) -> list[tuple[str, int, dict[str, str]]]:
        """(tenant, hour, counters hash) for every tenant and hour asked, one round trip."""
        pairs = [(t, h) for t in tenants for h in hours]
        async with self._batch() as pipe:
            for t, h in pairs:
                pipe.hgetall(self.k.usage(t, h))
            replies = await pipe.execute(raise_on_error=False)
        return [(t, h, cast(dict[str, str], self._checked(self.k.usage(t, h), r, {})))
                for (t, h), r in zip(pairs, replies, strict=True)]

    async def tenant_names(self) -> list[str]:
        return await self._members(self.k.tenants)
