"""Re-reading a router's cache on a miss, so that what another router wrote is seen at once.

A model (or adapter) registered through router A and asked for at router B a moment later must
not get a 404 from B's stale copy. A re-read only helps if it *began* after the request
arrived: sharing one that was already in flight, or skipping the re-read because one ran a
moment ago (the old rate limit), both answered 404 for a model whose registration had already
returned 201 (a CI flake: requests 17 ms after the 201 at another router were refused).

So a miss waits for a re-read that starts after it arrived. Concurrent misses share one, and
re-reads start at least ``spacing_s`` apart: a flood of unknown names costs Redis at most
1/spacing_s reads a second, and each such request waits at most that long for its 404.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

logger = logging.getLogger(__name__)

# Misses re-read at most this often; their 404 waits up to this long (plus one round trip).
MISS_SPACING_S = 0.05


class MissRefresher:
    """The owner's re-read (``read``), run through :meth:`read` by everyone (its timer, its
    admin writes, the misses), so that the outcome of the last one says whether the store is
    up: while it is failing a miss is answered from the cache at once instead of waiting out
    the Redis timeout (the owner's timer finds out when it is back)."""

    def __init__(self, read: Callable[[], Awaitable[None]],
                 spacing_s: float = MISS_SPACING_S, what: str = "cache") -> None:
        self._read = read
        self.store_ok = True
        self._spacing_s = spacing_s
        self._what = what
        self._started = float("-inf")  # when the newest completed re-read began
        self._next_at = 0.0
        self._pending: asyncio.Future[bool] | None = None
        self.reads = 0  # re-reads done on a miss, for tests and operators

    async def after(self, arrived: float) -> None:
        """Return once a re-read that began at or after ``arrived`` (a ``time.monotonic()``)
        has completed, or at once while the store is failing (or once a re-read failed)."""
        while self._started < arrived and self.store_ok:
            pending = self._pending
            if pending is None or pending.done():
                pending = self._pending = asyncio.ensure_future(self._spaced())
            if not await asyncio.shield(pending):
                return

    async def read(self) -> None:
        """The owner's re-read, its outcome recorded (``store_ok``); raises as it does."""
        try:
            await self._read()
        except BaseException:
            # Cancelled too: a read cut off by a timeout (the router's first load while
            # Redis hangs) says the store is not answering.
            self.store_ok = False
            raise
        self.store_ok = True

    async def _spaced(self) -> bool:
        delay = self._next_at - time.monotonic()
        if delay > 0:
            await asyncio.sleep(delay)
        started = time.monotonic()
        self._next_at = started + self._spacing_s
        self.reads += 1
        try:
            await self.read()
        except Exception as e:  # noqa: BLE001 - Redis down: the owner answers from its cache
            logger.warning("%s re-read on a miss failed (answering from the cache): %s",
                           self._what, e)
            return False
        self._started = started
        return True
