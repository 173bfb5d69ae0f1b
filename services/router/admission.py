"""Admission to a model with ``max_inflight``: let a request through while the model has a
free slot on this router, else queue it (:mod:`services.router.fairq`) until one frees up.

A model without ``max_inflight`` costs one dict lookup. With it and a free slot: a few
counter updates, O(1). The slots are this router's: ``max_inflight // routers`` per serving
replica (at least 1), where ``routers`` is ROUTER_COUNT, or (ROUTER_COUNT=0, the default)
the routers seen checking in lately (the key ring's count), so the routers together stay
within ``max_inflight`` on each replica, each counting exactly its own. docs/queueing.md says
what is exact and what is not.
"""

from __future__ import annotations

import asyncio
import math
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from services.router.fairq import Entry, FairQueue
from services.router.routes import RouteTable
from shared.errors import NoCapacity, QueueFull
from shared.models import ModelSpec
from shared.principal import Principal

# The Retry-After of a queue answer is the time the queue ahead would take to drain at the
# measured service time, within these bounds.
_RETRY_MIN_S = 1
_RETRY_MAX_S = 60
_EWMA = 0.2  # weight of the latest service time in the running mean


@dataclass(slots=True)
class Slot:
    """One admitted request's hold on a slot of ``alias``; released exactly once."""

    alias: str
    started: float = field(default_factory=time.monotonic)
    released: bool = False
    worker: str | None = None  # the replica it is sent to (the latest, after a failover)


@dataclass(slots=True)
class _Model:
    active: int = 0
    seated: Counter[str] = field(default_factory=Counter)  # worker -> slots taken there
    queue: FairQueue[asyncio.Future[Slot]] = field(default_factory=FairQueue)
    service_s: float = 1.0  # running mean of how long a slot is held


class Gate:
    def __init__(self, table: RouteTable, queue_max: int, queue_timeout_s: float,
                 routers: Callable[[], int] = lambda: 1) -> None:
        self.table = table
        self.queue_max = queue_max
        self.queue_timeout_s = queue_timeout_s
        self.routers = routers  # how many routers share every replica, now
        self.models: dict[str, _Model] = {}

    def share(self, max_inflight: int) -> int:
        """This router's slots on one replica."""
        return max(1, max_inflight // max(1, self.routers()))

    def capacity(self, alias: str, max_inflight: int) -> int:
        return self.share(max_inflight) * len(self.table.replicas(alias))

    def below_share(self, slot: Slot, replicas: list[str]) -> list[str]:
        """The replicas where this router has a slot free (all of them if none has: a
        replica ejected by the breaker still counts in the capacity)."""
        seated = self.models[slot.alias].seated
        share = self.share(self.cap(slot.alias) or 1)
        return [w for w in replicas if seated[w] < share] or replicas

    def seat(self, slot: Slot, worker: str) -> None:
        """``slot``'s request goes to ``worker`` (first, or on failover)."""
        seated = self.models[slot.alias].seated
        if slot.worker is not None:
            _take_one(seated, slot.worker)
        slot.worker = worker
        seated[worker] += 1

    def cap(self, alias: str) -> int | None:
        """The model's max_inflight: None (no queueing, nothing more to do) for most."""
        model = self.table.models.get(alias)
        return model.spec.max_inflight if model is not None else None

    async def enter(self, alias: str, cap: int, principal: Principal) -> Slot:
        """A slot of ``alias`` (whose max_inflight is ``cap``), waiting in its queue if none
        is free. Raises :class:`QueueFull` (429) or, past the deadline, :class:`NoCapacity`."""
        state = self.models.get(alias)
        if state is None:
            state = self.models[alias] = _Model()
        if state.active < self.capacity(alias, cap) and not state.queue:
            state.active += 1
            return Slot(alias)
        return await self._wait(alias, state, principal)

    async def _wait(self, alias: str, state: _Model, principal: Principal) -> Slot:
        if len(state.queue) >= self.queue_max:
            raise QueueFull(f"too many requests are queued for model '{alias}' (limit "
                            f"{self.queue_max} per router); retry later",
                            retry_after_s=self._retry_after(alias, state))
        waiter: asyncio.Future[Slot] = asyncio.get_running_loop().create_future()
        entry = state.queue.push(waiter, principal.tenant, principal.priority)
        self._drain(alias, state)  # a replica may have appeared since the last release
        served = False
        try:
            slot = await asyncio.wait_for(asyncio.shield(waiter), self.queue_timeout_s)
            served = True
            return slot
        except TimeoutError:
            raise NoCapacity(
                f"model '{alias}' is at its max_inflight on every replica and the request "
                f"waited {self.queue_timeout_s:g}s in its queue (QUEUE_TIMEOUT_S)",
                retry_after_s=self._retry_after(alias, state), code="queue_timeout") from None
        finally:
            if not served:
                self._abandon(alias, state, entry, waiter)

    def _abandon(self, alias: str, state: _Model, entry: Entry[asyncio.Future[Slot]],
                 waiter: asyncio.Future[Slot]) -> None:
        """A request that stops waiting (deadline, client gone) leaves the queue; a slot
        handed to it at that very moment goes back."""
        if waiter.done() and not waiter.cancelled():
            self.release(waiter.result())
            return
        waiter.cancel()
        state.queue.cancel(entry)
        self._drain(alias, state)  # forgets the model's state once nothing is left in it

    def release(self, slot: Slot) -> None:
        if slot.released:
            return
        slot.released = True
        state = self.models[slot.alias]
        held = time.monotonic() - slot.started
        state.service_s += _EWMA * (held - state.service_s)
        state.active -= 1
        if slot.worker is not None:
            _take_one(state.seated, slot.worker)
        self._drain(slot.alias, state)

    def _drain(self, alias: str, state: _Model) -> None:
        cap = self.cap(alias)
        if not state.queue:
            # Kept while the model is capped: making it anew per request cost 20 us.
            if cap is None and not state.active and self.models.get(alias) is state:
                del self.models[alias]
            return
        capacity = self.capacity(alias, cap) if cap is not None else math.inf
        while state.queue and state.active < capacity:
            waiter = state.queue.pop()
            if waiter is None:
                break
            if waiter.done():
                continue
            state.active += 1
            waiter.set_result(Slot(alias))

    def view(self) -> dict[str, dict[str, Any]]:
        """Capped models with requests in flight or queued here (for /admin/status)."""
        return {alias: {"inflight": m.active, "slots": self.capacity(alias, self.cap(alias) or 1),
                        "queued": len(m.queue), "by_replica": dict(m.seated)}
                for alias, m in sorted(self.models.items()) if m.active or m.queue}

    def _retry_after(self, alias: str, state: _Model) -> int:
        capacity = max(1, self.capacity(alias, self.cap(alias) or 1))
        ahead = len(state.queue) + 1
        return min(_RETRY_MAX_S, max(_RETRY_MIN_S, math.ceil(ahead * state.service_s /
                                                             capacity)))


def _take_one(counts: Counter[str], key: str) -> None:
    counts[key] -= 1
    if counts[key] <= 0:
        del counts[key]


# vLLM's `priority` request field: lower is served sooner, 0 is its default.
VLLM_PRIORITY = {"high": -10, "normal": 0, "low": 10}


class EnginePriority:
    """Whether a model's engine schedules by priority (``--scheduling-policy priority`` in
    its arguments), remembered per alias for as long as its spec is the same object: the
    request path reads a dict, not the argument list."""

    def __init__(self) -> None:
        self._seen: dict[str, tuple[ModelSpec, bool]] = {}

    def __call__(self, spec: ModelSpec) -> bool:
        known = self._seen.get(spec.alias)
        if known is not None and known[0] is spec:
            return known[1]
        args = spec.extra_args  # normalized: "--flag", "value" as two items
        on = any(a == "--scheduling-policy" and args[i + 1:i + 2] == ["priority"]
                 for i, a in enumerate(args))
        self._seen[spec.alias] = (spec, on)
        return on
