"""The engine's running batch, for ``--enforce-max-num-seqs``: at most ``max_num_seqs``
sequences generate at once and the rest wait, as in vLLM, so a saturated replica's latency
grows with its load. Waiting sequences start first come first served, or by their request's
``priority`` (lower first, then arrival) under ``--scheduling-policy priority``."""

from __future__ import annotations

import asyncio
import heapq
import itertools


class Seats:
    def __init__(self, limit: int, by_priority: bool) -> None:
        self.limit = limit
        self.by_priority = by_priority
        self.taken = 0
        self._waiting: list[tuple[int, int, asyncio.Future[None]]] = []
        self._seq = itertools.count()

    async def take(self, priority: int) -> None:
        if self.taken < self.limit and not self._waiting:
            self.taken += 1
            return
        seat: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        rank = priority if self.by_priority else 0
        heapq.heappush(self._waiting, (rank, next(self._seq), seat))
        try:
            await seat  # given with the seat already counted as taken
        except asyncio.CancelledError:
            if seat.done() and not seat.cancelled():
                self.give_back()  # handed over as the client left
            raise

    def give_back(self) -> None:
        self.taken -= 1
        while self._waiting and self.taken < self.limit:
            _, _, seat = heapq.heappop(self._waiting)
            if not seat.done():
                self.taken += 1
                seat.set_result(None)
