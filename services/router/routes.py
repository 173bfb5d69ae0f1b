"""The router's in-memory copy of models and routes: the hot path reads only this.

Refreshed on pub/sub hints and on a short timer, and only what changed (version counters);
a router that loses Redis keeps serving from the last copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from shared.events import Nudger
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)

_MISS_REFRESH_S = 0.2


class RouteTable:
    def __init__(self, store: Store, nudger: Nudger, refresh_s: float) -> None:
        self.store = store
        self.nudger = nudger
        self.refresh_s = refresh_s
        self.models: dict[str, StoredModel] = {}
        self._all_routes: dict[str, dict[str, str]] = {}
        self.routes: dict[str, dict[str, str]] = {}
        self.alive: set[str] = set()
        self.loads: dict[str, dict[str, float]] = {}
        self._versions: tuple[str, str] | None = None
        self._last_refresh = 0.0
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        async with self._lock:
            versions = await self.store.versions()
            if versions != self._versions:
                if self._versions is None or versions[0] != self._versions[0]:
                    self.models = {m.spec.alias: m for m in await self.store.list_models()}
                self._all_routes = await self.store.all_routes(self.models)
                self._versions = versions
            workers = {w for r in self._all_routes.values() for w in r}
            # Liveness is re-read every pass: a dead worker's routes stop being used within
            # one refresh, before the manager gets round to removing them.
            self.alive = await self.store.alive(workers)
            self.routes = {
                a: {w: u for w, u in r.items() if w in self.alive}
                for a, r in self._all_routes.items()
            }
            # Engine load matters only where there is a choice to make.
            multi = [a for a, r in self.routes.items() if len(r) > 1]
            self.loads = await self.store.loads(multi) if multi else {}
            self._last_refresh = time.monotonic()
            # Wake everything waiting for a replica to appear, then arm a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()

    async def changed(self, timeout_s: float) -> None:
        """Return after the next refresh, or after ``timeout_s``."""
        event = self._changed
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(event.wait(), timeout_s)

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving from the cache
                logger.warning("route refresh failed (serving from cache): %s", e)
            await self.nudger.wait(self.refresh_s)

    async def model(self, alias: str) -> StoredModel | None:
        """The model for ``alias``; an unknown alias triggers one rate-limited refresh, so a
        model registered through another router is found at once."""
        found = self.models.get(alias)
        if found is None and time.monotonic() - self._last_refresh > _MISS_REFRESH_S:
            try:
                await self.refresh()
            except Exception as e:  # noqa: BLE001 - Redis down: answer from the cache
                logger.warning("refresh on miss failed: %s", e)
            found = self.models.get(alias)
        return found

    def replicas(self, alias: str) -> dict[str, str]:
        return self.routes.get(alias, {})

    def load(self, alias: str) -> dict[str, float]:
        """Running + waiting requests per replica, as workers last reported them."""
        return self.loads.get(alias, {})
