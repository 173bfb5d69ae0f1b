"""The scheduling loop: converge assignments toward the registered models.

Level-triggered: each pass reads the whole desired and observed state and fixes differences,
so lost pub/sub hints or a crashed manager cost only latency. Only the lease holder acts, and
each of its writes is fenced by the lease token (see :mod:`shared.store`).
"""

from __future__ import annotations

import asyncio
import logging
from dataclasses import dataclass

from services.manager.placement import Choice, choose_worker
from shared.events import Nudger
from shared.models import Assignment, WorkerView
from shared.settings import ManagerSettings
from shared.store import NotLeader, Store, StoredModel

logger = logging.getLogger(__name__)


@dataclass
class LeaderState:
    epoch: int = 0
    passes: int = 0

    @property
    def leader(self) -> bool:
        return self.epoch > 0


class Scheduler:
    def __init__(self, store: Store, settings: ManagerSettings, nudger: Nudger) -> None:
        self.store = store
        self.settings = settings
        self.nudger = nudger
        self.state = LeaderState()
        self._reasons: dict[str, str] = {}

    @property
    def token(self) -> str:
        return f"{self.settings.manager_id}|{self.state.epoch}"

    async def run(self) -> None:
        while True:
            try:
                await self.tick()
            except asyncio.CancelledError:
                raise
            except NotLeader:
                logger.warning("lost the scheduler lease mid-pass (epoch %s)", self.state.epoch)
                self.state.epoch = 0
            except Exception:
                logger.exception("scheduler pass failed")
            await self.nudger.wait(self.settings.schedule_interval_s)

    async def tick(self) -> None:
        epoch = await self.store.acquire_lease(self.settings.manager_id, self.settings.lease_ttl_s)
        if epoch != self.state.epoch:
            logger.info("scheduler lease: %s", f"leader at epoch {epoch}" if epoch else "standby")
            self.state.epoch = epoch
        if epoch:
            await self.reconcile()
            self.state.passes += 1

    async def release(self) -> None:
        if self.state.leader:
            await self.store.release_lease(self.token)
            self.state.epoch = 0

    async def reconcile(self) -> None:
        workers = await self.store.list_workers()
        models = {m.spec.alias: m for m in await self.store.list_models()}
        assigns = await self.store.assignments(w.worker_id for w in workers)
        for w in workers:
            if not w.alive and assigns[w.worker_id]:
                await self._forget(w, list(models))
                assigns[w.worker_id] = {}
        for w in workers:
            for alias in list(assigns[w.worker_id]):
                if alias not in models:
                    await self.store.unassign(self.token, w.worker_id, alias)
                    del assigns[w.worker_id][alias]
        for model in models.values():
            if model.hold is None:
                await self._converge_model(model, workers, assigns)

    async def _forget(self, w: WorkerView, aliases: list[str]) -> None:
        logger.warning("worker %s is dead (heartbeat expired); re-placing its models", w.worker_id)
        await self.store.forget_dead_worker(self.token, w.worker_id, aliases)

    async def _converge_model(
        self,
        model: StoredModel,
        workers: list[WorkerView],
        assigns: dict[str, dict[str, Assignment]],
    ) -> None:
        spec = model.spec
        # An operator's manual placements are extra to `replicas` and never undone: the
        # scheduler counts, adds and removes only its own.
        holders = [w for w, mine in assigns.items()
                   if spec.alias in mine and mine[spec.alias].source == "scheduler"]
        for _ in range(spec.replicas - len(holders)):
            choice = choose_worker(spec, workers, assigns)
            if not isinstance(choice, Choice):
                await self._note_unplaced(spec.alias, choice.text())
                return
            a = Assignment(
                alias=spec.alias,
                worker_id=choice.worker_id,
                epoch=self.state.epoch,
                gpus=choice.gpus,
                reserved_mb=choice.reserved_mb,
                spec_version=model.version,
            )
            await self.store.assign(self.token, a)
            assigns[choice.worker_id][spec.alias] = a
            self._reasons.pop(spec.alias, None)
            logger.info("placed %s on %s (gpus %s)", spec.alias, choice.worker_id, choice.gpus)
        for w in sorted(holders, reverse=True)[: max(0, len(holders) - spec.replicas)]:
            await self.store.unassign(self.token, w, spec.alias)
            del assigns[w][spec.alias]

    async def _note_unplaced(self, alias: str, reason: str) -> None:
        if self._reasons.get(alias) != reason:
            logger.warning("cannot place %s: %s", alias, reason)
            await self.store.set_placement_reason(alias, reason)
            self._reasons[alias] = reason
