"""The order in which a router lets queued requests of one model through: pure, no I/O.

Strict priority first (high, then normal, then low), then fair share between tenants, in the
style of the Virtual Token Counter (Sheng et al., "Fairness in Serving Large Language
Models", OSDI 2024): every tenant has a counter of the service it was given (here: one per
request let through, or the request's cost), and the backlogged tenant with the lowest counter
goes next. A tenant that starts waiting has its counter lifted to the last served counter, so
an idle tenant banks no credit to burst with later; within a tenant, first come first served.
Counters are forgotten when the queue empties: fairness is about who waits now, and the table
of tenants stays bounded.

Costs: push O(log t), pop O(log t) amortized (t: tenants waiting at that priority),
cancel O(1) (the entry is skipped when it comes up).
"""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from dataclasses import dataclass, field
from typing import Generic, TypeVar

from shared.principal import PRIORITIES

T = TypeVar("T")

RANK = {name: rank for rank, name in enumerate(PRIORITIES)}  # high 0, normal 1, low 2


@dataclass(slots=True, eq=False)
class Entry(Generic[T]):
    item: T
    tenant: str
    rank: int
    cost: float = 1.0
    live: bool = True


@dataclass(slots=True)
class _Level(Generic[T]):
    """One priority level: each waiting tenant's FIFO, and a heap of (counter, seq, tenant)
    whose stale entries (counter moved on, tenant drained) are dropped when they surface."""

    waiting: dict[str, deque[Entry[T]]] = field(default_factory=dict)
    heap: list[tuple[float, int, str]] = field(default_factory=list)


class FairQueue(Generic[T]):
    def __init__(self) -> None:
        self._levels: list[_Level[T]] = [_Level() for _ in PRIORITIES]
        self._counters: dict[str, float] = {}
        self._floor = 0.0  # the counter of the tenant served last
        self._seq = itertools.count()
        self._size = 0

    def __len__(self) -> int:
        return self._size

    def counter(self, tenant: str) -> float:
        return self._counters.get(tenant, 0.0)

    def push(self, item: T, tenant: str, priority: str = "normal", cost: float = 1.0
             ) -> Entry[T]:
        entry = Entry(item, tenant, RANK.get(priority, RANK["normal"]), cost)
        level = self._levels[entry.rank]
        fifo = level.waiting.get(tenant)
        if fifo is None:
            if not self._backlogged(tenant):
                self._counters[tenant] = max(self.counter(tenant), self._floor)
            fifo = level.waiting[tenant] = deque()
            self._schedule(level, tenant)
        fifo.append(entry)
        self._size += 1
        return entry

    def cancel(self, entry: Entry[T]) -> None:
        """Take ``entry`` out (its deadline passed, its client left)."""
        if entry.live:
            entry.live = False
            self._size -= 1
            if not self._size:
                self._reset()

    def pop(self) -> T | None:
        """The next item to let through, charged to its tenant; None when nothing waits."""
        for level in self._levels:
            while level.heap:
                counter, _, tenant = heapq.heappop(level.heap)
                fifo = level.waiting.get(tenant)
                if fifo is None or counter != self.counter(tenant):
                    continue  # stale: the tenant was served since, or has drained
                while fifo and not fifo[0].live:
                    fifo.popleft()
                if not fifo:
                    del level.waiting[tenant]
                    continue
                return self._serve(level, fifo.popleft())
            level.waiting.clear()  # only tenants whose every entry was cancelled remain
        return None

    def _serve(self, level: _Level[T], entry: Entry[T]) -> T:
        entry.live = False
        self._size -= 1
        tenant = entry.tenant
        self._floor = self.counter(tenant)
        self._counters[tenant] = self._floor + entry.cost
        if level.waiting[tenant]:
            self._schedule(level, tenant)
        else:
            del level.waiting[tenant]
        # The tenant's entries at other levels were scheduled under its old counter.
        for other in self._levels:
            if other is not level and tenant in other.waiting:
                self._schedule(other, tenant)
        if not self._size:
            self._reset()
        return entry.item

    def _schedule(self, level: _Level[T], tenant: str) -> None:
        heapq.heappush(level.heap, (self.counter(tenant), next(self._seq), tenant))

    def _backlogged(self, tenant: str) -> bool:
        return any(tenant in level.waiting for level in self._levels)

    def _reset(self) -> None:
        for level in self._levels:
            level.waiting.clear()
            level.heap.clear()
        self._counters.clear()
        self._floor = 0.0
