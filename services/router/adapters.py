"""The router's copy of the LoRA adapters: which exist (alias -> base), and which replicas of
each base hold which adapter now (published by workers), for balancing.

Refreshed on a timer, like the route table; an alias not found waits for a refresh begun after
it arrived (misses.py), so an adapter registered through another router is served at once.
"""

from __future__ import annotations

import asyncio
import logging
import time

from services.router.misses import MissRefresher
from shared.models import AdapterSpec
from shared.store import Store

logger = logging.getLogger(__name__)


class AdapterTable:
    def __init__(self, store: Store, refresh_s: float) -> None:
        self.store = store
        self.refresh_s = refresh_s
        self.adapters: dict[str, AdapterSpec] = {}
        # base -> worker -> adapters its engine holds.
        self.held: dict[str, dict[str, frozenset[str]]] = {}
        self.misses = MissRefresher(self._load, what="adapter table")

    async def refresh(self) -> None:
        await self.misses.read()

    async def _load(self) -> None:
        adapters = await self.store.list_adapters()
        bases = sorted({a.base for a in adapters.values()})
        self.held = await self.store.lora_loaded(bases) if bases else {}
        self.adapters = adapters

    async def run(self) -> None:
        while True:
            try:
                await self.refresh()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep serving from the last copy
                logger.warning("adapter refresh failed (serving from cache): %s", e)
            await asyncio.sleep(self.refresh_s)

    async def lookup(self, alias: str) -> AdapterSpec | None:
        """The adapter named ``alias``; refreshed first when unknown (misses.py)."""
        found = self.adapters.get(alias)
        if found is None:
            await self.misses.after(time.monotonic())
            found = self.adapters.get(alias)
        return found

    def holders(self, base: str, adapter: str) -> frozenset[str]:
        """Workers whose engine of ``base`` holds ``adapter``, as last published."""
        return frozenset(w for w, names in self.held.get(base, {}).items() if adapter in names)

    def learn(self, spec: AdapterSpec) -> None:
        self.adapters = self.adapters | {spec.alias: spec}

    def forget(self, alias: str) -> None:
        self.adapters = {a: s for a, s in self.adapters.items() if a != alias}
