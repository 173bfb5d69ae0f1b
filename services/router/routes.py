"""The router's in-memory copy of models and routes: the hot path reads only this.

Refreshed on pub/sub hints and on a short timer, and only what changed: nothing when the
version counters did not move; on a route change, only the aliases named in the routes log
since the last pass (``ObservedStore.route_changes``); on a model change (register, delete,
hold), only the models named in the models log, and their routes; everything when a log
does not account for every bump of its version. Liveness is re-read every pass. A router
that loses Redis keeps serving from the last copy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time

from services.router.misses import MissRefresher
from shared.events import Nudger
from shared.store import Store, StoredModel
from shared.store.observed import RouteChanges

logger = logging.getLogger(__name__)

# Route changes read from the log in one pass; more than that and a full reload is as cheap.
_LOG_READ_MAX = 1000


class RouteTable:
    def __init__(self, store: Store, nudger: Nudger, refresh_s: float) -> None:
        self.store = store
        self.nudger = nudger
        self.refresh_s = refresh_s
        self.models: dict[str, StoredModel] = {}
        self._all_routes: dict[str, dict[str, str]] = {}
        self._workers: set[str] = set()
        self.routes: dict[str, dict[str, str]] = {}
        self._multi: list[str] = []
        self.alive: set[str] = set()
        self.loads: dict[str, dict[str, float]] = {}
        self._versions: tuple[str, str] | None = None
        self._log_id: str | None = None
        self._models_log_id: str | None = None
        # Aliases whose serving routes must be rebuilt from ``_all_routes`` (None: all). Kept
        # across a pass that fails after re-reading routes, so the next one still rebuilds.
        self._stale: set[str] | None = None
        # How the routes were last brought up to date, for tests and operators.
        self.full_reloads = 0
        self.partial_reloads = 0
        self.model_reloads = 0  # passes that re-read only the models named in the models log
        self.misses = MissRefresher(self._refresh, what="route table")
        self._lock = asyncio.Lock()
        self._changed = asyncio.Event()

    async def refresh(self) -> None:
        await self.misses.read()

    async def _refresh(self) -> None:
        async with self._lock:
            # One round trip when nothing changed: versions, logs and liveness together.
            workers = self._workers
            log = await self.store.route_changes(self._log_id, _LOG_READ_MAX,
                                                 self._models_log_id, workers)
            if log.versions != self._versions:
                changed = await self._reload(log)
                self._stale = None if changed is None or self._stale is None else (
                    self._stale | changed)
            # Liveness is re-read every pass: a dead worker's routes stop being used within
            # one refresh, before the manager gets round to removing them.
            alive = log.alive if self._workers == workers else await self.store.alive(
                self._workers)
            if self._stale is None or alive != self.alive:
                self.alive = alive
                self.routes = {a: self._serving(r) for a, r in self._all_routes.items()}
                self._multi = [a for a, r in self.routes.items() if len(r) > 1]
            elif self._stale:
                routes = dict(self.routes)
                for a in self._stale:
                    raw = self._all_routes.get(a)
                    if raw is None:
                        routes.pop(a, None)
                    else:
                        routes[a] = self._serving(raw)
                self.routes = routes
                self._multi = [a for a, r in routes.items() if len(r) > 1]
            self._stale = set()
            # Engine load matters only where there is a choice to make.
            self.loads = await self.store.loads(self._multi) if self._multi else {}
            # Wake everything waiting for a replica to appear, then arm a fresh event.
            self._changed.set()
            self._changed = asyncio.Event()

    async def _reload(self, log: RouteChanges) -> set[str] | None:
        """Bring models and routes up to the versions now in Redis (``log``). Returns the
        aliases whose routes were re-read, or None when everything was."""
        changed = self._logged(log)
        if self._versions is None or log.versions[0] != self._versions[0]:
            touched = self._logged_models(log)
            if touched is None:
                listed, unreadable = await self.store.list_models_checked()
                # One whose record does not parse keeps serving from what was read before.
                kept = {a: self.models[a] for a in unreadable if a in self.models}
                self.models = kept | {m.spec.alias: m for m in listed}
                changed = None
            else:
                await self._reload_models(touched)
                changed = None if changed is None else changed | touched
        if changed is None:
            self._all_routes = await self.store.all_routes(self.models)
            self.full_reloads += 1
        elif changed:
            # Routes of an alias not registered (any more) are not served, as in a full load.
            gone = {a for a in changed if a not in self.models}
            live = changed - gone
            routes = {a: r for a, r in self._all_routes.items() if a not in gone}
            if live:
                routes |= await self.store.all_routes(sorted(live))
                self.partial_reloads += 1
            self._all_routes = routes
        if changed is None or changed:
            self._workers = {w for r in self._all_routes.values() for w in r}
        # Only once everything above was read: a failed pass leaves the old marks, and the
        # next one starts over from them.
        self._versions = log.versions
        self._log_id = log.last_id
        self._models_log_id = log.models_last_id
        return changed

    async def _reload_models(self, touched: set[str]) -> None:
        """Re-read only the models named in the models log (registered, deleted, held or
        released): a register or delete re-read the whole table, so 1,000 of them took
        minutes."""
        fresh, unreadable = await self.store.get_models_checked(sorted(touched))
        models = dict(self.models)
        for a in touched:
            if a in fresh:
                models[a] = fresh[a]
            elif a not in unreadable:
                models.pop(a, None)
        self.models = models
        self.model_reloads += 1

    def _logged_models(self, log: RouteChanges) -> set[str] | None:
        """The models changed since the last pass, if the models log accounts for every bump
        of the models version; None (reload every model) otherwise."""
        if self._versions is None or log.models is None:
            return None
        return _accounted(log.models, log.versions[0], self._versions[0])

    def _logged(self, log: RouteChanges) -> set[str] | None:
        """The aliases whose routes changed since the last pass, if the log accounts for every
        bump of the routes version since then; None (reload everything) otherwise."""
        if self._versions is None or log.aliases is None:
            return None
        return _accounted(log.aliases, log.versions[1], self._versions[1])

    def _serving(self, raw: dict[str, str]) -> dict[str, str]:
        """The routes of ``raw`` whose worker is alive (``raw`` itself when all are: no copy
        per alias and pass, which the cyclic GC would have to sweep)."""
        if all(w in self.alive for w in raw):
            return raw
        return {w: u for w, u in raw.items() if w in self.alive}

    async def learn(self, model: StoredModel) -> None:
        """A model this router just registered: served at once, without a reload (the next
        refresh re-reads it from the models log anyway)."""
        async with self._lock:
            self.models = self.models | {model.spec.alias: model}

    async def forget(self, alias: str) -> None:
        """A model this router just deleted: its requests get 404 at once."""
        async with self._lock:
            self.models = {a: m for a, m in self.models.items() if a != alias}
            self.routes = {a: r for a, r in self.routes.items() if a != alias}
            self._all_routes.pop(alias, None)

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
        """The model for ``alias``; an unknown alias waits for a refresh begun after it
        arrived, so a model registered through another router is found at once (misses.py)."""
        found = self.models.get(alias)
        if found is None:
            await self.misses.after(time.monotonic())
            found = self.models.get(alias)
        return found

    def replicas(self, alias: str) -> dict[str, str]:
        return self.routes.get(alias, {})

    def load(self, alias: str) -> dict[str, float]:
        """Running + waiting requests per replica, as workers last reported them."""
        return self.loads.get(alias, {})


def _accounted(aliases: list[str], now: str, before: str) -> set[str] | None:
    """``aliases`` (a log's entries since the last pass), if they account for every bump of
    its version from ``before`` to ``now``; None when the log cannot be trusted."""
    try:
        moved = int(now) - int(before)
    except ValueError:
        return None
    # Fewer entries: trimmed, or a writer that bumps the version without logging (older
    # code, a dead worker's cleanup). More, or a version that went back: Redis was flushed
    # or failed over, or a corrupt counter was repaired. Either way, reload everything.
    if moved < 0 or len(aliases) != moved:
        return None
    return set(aliases)
