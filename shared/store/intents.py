"""Operators' requests (wake, sleep, stop, manual start and stop on a worker).

None of them writes an assignment: the scheduler alone writes ``assign:*`` (fenced by its
lease), so an operator's action can never undo a newer scheduler write, nor the scheduler an
operator's newer request. Each action records what the operator wants (a hold, a manual
placement, demand, a sleep intent); the scheduler reads them on every pass and converges the
assignments to the last request, reserving GPU memory for manual placements like for any other.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from typing import cast

from redis.asyncio.client import Pipeline

from shared.store.base import StoreBase

# Deletes an intent only if it is still the one the scheduler applied (not a newer one).
_CLEAR_IF_SAME_LUA = """
if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end
return 0
"""

# A sleep request not applied by then (no scheduler running) is dropped rather than applied
# long after the operator asked.
SLEEP_INTENT_TTL_S = 60.0


@dataclass(frozen=True)
class Intents:
    """What operators asked for one alias."""

    manual: frozenset[str] = frozenset()
    """Workers an operator placed the alias on by hand."""
    sleep: str | None = None
    """The raw pending sleep request, if any (passed back to :meth:`clear_intent`)."""


class IntentsStore(StoreBase):
    async def request_manual_start(self, alias: str, worker_id: str) -> None:
        """Ask the scheduler to place ``alias`` on ``worker_id`` (extra to its replicas);
        lifts a stop."""
        note = json.dumps({"at": time.time()})

        def build(pipe: Pipeline) -> None:
            pipe.hset(self.k.manual(alias), worker_id, note)
            pipe.delete(self.k.hold(alias), self.k.placement(alias))

        await self._commit(self.k.hold(alias), build, [self._model_changed(alias)])
        await self.publish("intent", alias=alias, worker=worker_id)

    async def request_manual_stop(self, alias: str, worker_id: str) -> None:
        """Drop the manual placement on ``worker_id`` and hold the alias: the scheduler
        removes its own replicas and places none until someone starts or wakes it. Manual
        placements on other workers stay."""
        note = json.dumps({"by": worker_id, "at": time.time(), "reason": "stopped manually"})

        def build(pipe: Pipeline) -> None:
            pipe.hdel(self.k.manual(alias), worker_id)
            pipe.set(self.k.hold(alias), note)
            pipe.delete(self.k.demand(alias), self.k.intent(alias))

        await self._commit(self.k.hold(alias), build, [self._model_changed(alias)])
        await self.publish("intent", alias=alias, worker=worker_id)

    async def hold_model(self, alias: str, reason: str) -> None:
        """Stop every instance of ``alias`` (manual ones too) and keep it stopped until it is
        woken or started by hand."""
        note = json.dumps({"at": time.time(), "reason": reason})

        def build(pipe: Pipeline) -> None:
            pipe.set(self.k.hold(alias), note)
            pipe.delete(self.k.manual(alias), self.k.demand(alias), self.k.intent(alias))

        await self._commit(self.k.hold(alias), build, [self._model_changed(alias)])
        await self.publish("intent", alias=alias)

    async def request_wake(self, alias: str, demand_ttl_s: float) -> None:
        """Lift a stop and a pending sleep, and record demand: the scheduler places the alias
        or points its assignments back at 'running'."""

        def build(pipe: Pipeline) -> None:
            pipe.delete(self.k.hold(alias), self.k.intent(alias))
            pipe.set(self.k.demand(alias), repr(time.time()),
                     px=max(1, int(demand_ttl_s * 1000)))

        await self._commit(self.k.hold(alias), build, [self._model_changed(alias)])
        await self.publish("intent", alias=alias)

    async def request_sleep(self, alias: str) -> None:
        """Ask the scheduler to point every assignment of ``alias`` at 'sleeping'."""
        note = json.dumps({"action": "sleep", "at": time.time()})

        def build(pipe: Pipeline) -> None:
            pipe.set(self.k.intent(alias), note, px=int(SLEEP_INTENT_TTL_S * 1000))
            pipe.delete(self.k.demand(alias))

        await self._commit(self.k.intent(alias), build, [self._intent_changed(alias)])
        await self.publish("intent", alias=alias)

    async def targets_of(self, alias: str) -> dict[str, str]:
        """worker -> target of each assignment of ``alias`` (for the admin API's checks)."""
        workers = await self._members(self.k.workers)
        async with self._batch() as pipe:
            for w in workers:
                pipe.hget(self.k.assign(w), alias)
            raws = await pipe.execute(raise_on_error=False)
        out = {}
        for w, reply in zip(workers, raws, strict=True):
            raw = self._checked(self.k.assign(w), reply, None)
            try:
                out[w] = str(json.loads(raw).get("target", "running")) if raw else None
            except (ValueError, AttributeError):  # a corrupt entry: not this check's problem
                out[w] = None
        return {w: t for w, t in out.items() if t is not None}

    async def intents(self, aliases: list[str]) -> dict[str, Intents]:
        """Every alias's operator requests, in one round trip (for the scheduler's pass)."""
        flat = await self._reads([key for a in aliases
                                  for key in (self.k.manual(a), self.k.intent(a))],
                                 ("HKEYS", "GET"))
        out = {}
        for i, a in enumerate(aliases):
            # A key of the wrong type is reported and read as no request: it must not stop
            # the scheduler's pass for every other alias.
            manual = cast(list[str], self._checked(self.k.manual(a), flat[2 * i], []))
            sleep = cast(str | None, self._checked(self.k.intent(a), flat[2 * i + 1], None))
            if manual or sleep:
                out[a] = Intents(frozenset(manual), sleep)
        return out

    async def clear_intent(self, alias: str, applied: str) -> None:
        """Delete the intent the scheduler has applied, unless a newer one replaced it."""
        await self.r.eval(_CLEAR_IF_SAME_LUA, 1, self.k.intent(alias), applied)
