"""The sole owner of this worker's engine instances.

Only the supervisor starts, sleeps, wakes and stops engine processes; the API and the agent ask
it (through :meth:`Supervisor.reconcile`). Each instance runs at most one transition at a time
(:mod:`services.worker.flows`); the supervisor decides which, from the assignment's target.
States change only through :mod:`services.worker.lifecycle`.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Coroutine
from typing import Any

import httpx

from services.worker.engines.base import EngineDriver, EngineProcess
from services.worker.flows import Flows
from services.worker.instance import Instance
from services.worker.lifecycle import allowed
from services.worker.metrics import WorkerMetrics
from shared.models import Assignment, InstanceState, is_valid_name
from shared.settings import WorkerSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)

S = InstanceState
Wanted = dict[str, tuple[Assignment, StoredModel]]


class Supervisor:
    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        drivers: dict[str, EngineDriver],
        client: httpx.AsyncClient,
        metrics: WorkerMetrics | None = None,
        traffic: Callable[[str], float] | None = None,
    ) -> None:
        self.store = store
        # An engine URL -> when the proxy last got response bytes from it (Pool.heard_from).
        self.traffic = traffic
        self.settings = settings
        self.drivers = drivers
        self.instances: dict[str, Instance] = {}
        self.flows = Flows(store, settings, drivers, client, self.sleeping_ram_mb, metrics)
        self.life = self.flows.life
        self.url = self.flows.url
        self._lock = asyncio.Lock()
        self._reported: dict[str, tuple[int, float]] = {}
        self._loads: dict[str, float | None] = {}
        # Stopped engines whose GPU reservation waits for their processes to be gone.
        self._releasing: dict[str, EngineProcess | None] = {}

    @property
    def worker_id(self) -> str:
        return self.settings.worker_id

    def serving(self, alias: str) -> EngineProcess | None:
        inst = self.instances.get(alias)
        return inst.engine if inst is not None and inst.state is S.RUNNING else None

    def sleeping_ram_mb(self) -> int:
        return sum(i.ram_claim_mb for i in self.instances.values())

    # ------------------------------------------------------------------ GPU accounting
    def _live(self) -> list[Instance]:
        return [i for i in self.instances.values()
                if i.engine is not None and i.engine.exit_code() is None]

    def engine_pgids(self) -> set[int]:
        return {i.engine.pid for i in self._live() if i.engine and i.engine.pid}

    def engine_uses(self) -> list[tuple[int, int, int]]:
        """(pid, GPU, MB) of each live engine: what a real GPU would show as its processes."""
        return [(i.engine.pid, g, i.assignment.mb_per_gpu) for i in self._live()
                if i.engine and i.engine.pid for g in i.assignment.gpus]

    def reserved_by_gpu(self) -> dict[int, int]:
        out: dict[int, int] = {}
        for _, g, mb in self.engine_uses():
            out[g] = out.get(g, 0) + mb
        return out

    # ------------------------------------------------------------------ request accounting
    def begin(self, alias: str) -> None:
        inst = self.instances.get(alias)
        if inst is not None:
            inst.inflight += 1
            inst.last_request_at = time.time()

    def end(self, alias: str) -> None:
        inst = self.instances.get(alias)
        if inst is not None:
            inst.inflight = max(0, inst.inflight - 1)
            inst.last_request_at = time.time()

    # ------------------------------------------------------------------ reconcile
    async def reconcile(self, wanted: Wanted, reserved: set[str] | None = None) -> None:
        """Converge local instances to ``wanted`` (alias -> assignment and model), and release
        the ledger entries in ``reserved`` that no engine of this worker holds any more."""
        async with self._lock:
            stopped = set()
            for alias, inst in list(self.instances.items()):
                want = wanted.get(alias)
                if (want is None or want[1].version != inst.model.version
                        or inst.state is S.STOPPING):
                    try:
                        await self._stop(alias)
                        stopped.add(alias)
                    except Exception as e:  # noqa: BLE001 - kept, and stopped again next pass
                        logger.warning("could not record the stop of %s: %s", alias, e)
            if stopped - set(wanted):
                await self.forget_deleted(stopped - set(wanted))
            for alias, (a, m) in wanted.items():
                current = self.instances.get(alias)
                if current is None:
                    inst = Instance(alias, a, m)
                    self.instances[alias] = inst
                    self._run(inst, self.flows.start(inst))
                elif current.state is not S.STOPPING:
                    current.assignment = a
                    await self._converge(current)
            await self._report_usage()
            await self._release(set(reserved or ()) - set(wanted) - set(self.instances))

    async def forget_deleted(self, aliases: set[str]) -> None:
        """Remove the engine logs of those of ``aliases`` whose model is deleted (nothing of
        a deleted model is kept; its records went with its spec)."""
        registered = await self.store.get_models(sorted(aliases))
        for alias in aliases - set(registered) - set(self.instances):
            path = self.flows.log_path(alias)
            if path.exists():
                path.unlink(missing_ok=True)
                logger.info("removed the engine log of deleted model %s", alias)

    def logged_aliases(self) -> set[str]:
        """Aliases that have an engine log in this worker's state dir."""
        folder = self.flows.log_path("x").parent
        if not folder.is_dir():
            return set()
        return {p.stem for p in folder.glob("*.log") if is_valid_name(p.stem)}

    async def _release(self, aliases: set[str]) -> None:
        """Give back GPU reservations, each only once its engine's processes are all gone."""
        for alias in aliases | set(self._releasing):
            engine = self._releasing.get(alias)
            if alias in self.instances or (engine is not None and not engine.gone()):
                continue
            await self.store.release_reservation(self.worker_id, alias)
            self._releasing.pop(alias, None)

    async def _converge(self, inst: Instance) -> None:
        if inst.busy:
            return
        if inst.unsynced:  # an earlier write of record and route failed: write them again
            await self.life.sync(inst)
        target = inst.assignment.target
        engine_gone = inst.engine is not None and inst.engine.exit_code() is not None
        if inst.state in (S.RUNNING, S.SLEEPING) and engine_gone:
            assert inst.engine is not None
            why = f"engine exited with code {inst.engine.exit_code()} while {inst.state.value}"
            await self.flows.fail(inst, why)
        elif inst.state is S.FAILED and time.time() >= inst.retry_at:
            logger.info("retrying %s (failure %d)", inst.alias, inst.failures)
            self._run(inst, self.flows.start(inst))
        elif inst.state is S.RUNNING and target == "sleeping":
            self._run(inst, self.flows.sleep(inst))
        elif inst.state is S.SLEEPING and target == "running":
            self._run(inst, self.flows.wake(inst))
        elif inst.state is S.STOPPED and target == "running":
            self._run(inst, self.flows.start(inst))

    def _run(self, inst: Instance, flow: Coroutine[Any, Any, None]) -> None:
        inst.task = asyncio.create_task(self._guarded(inst, flow))

    async def _guarded(self, inst: Instance, flow: Coroutine[Any, Any, None]) -> None:
        try:
            await flow
        except asyncio.CancelledError:
            raise
        except Exception as e:  # e.g. Redis gone mid-flow: fail, retry later
            logger.exception("transition of %s failed", inst.alias)
            inst.error = f"transition failed: {e}"
            inst.retry_at = time.time() + self.settings.engine_retry_base_s
            try:
                if allowed(inst.state, S.FAILED):
                    await self.life.transition(inst, S.FAILED)
            except Exception as e2:  # noqa: BLE001 - unsynced: written on the next pass
                logger.warning("could not record the failure of %s: %s", inst.alias, e2)
            finally:
                if inst.engine is not None:
                    await inst.engine.stop(self.settings.engine_stop_grace_s)

    async def _report_usage(self) -> None:
        """Write in-flight counts and last-request times that changed (the idle clock), and
        each serving engine's load for the routers' balancing."""
        for alias, inst in self.instances.items():
            usage = inst.usage()
            if self._reported.get(alias) != usage and not inst.busy and not inst.unsynced:
                await self.flows.publish(inst)
                self._reported[alias] = usage
            if inst.state is S.RUNNING and inst.engine is not None:
                load = await inst.engine.load(self.flows.client)
                if load != self._loads.get(alias):
                    await self.store.set_load(alias, self.worker_id, load)
                    self._loads[alias] = load

    # ------------------------------------------------------------------ health
    async def health_loop(self) -> None:
        """Check every serving engine's health each ``ENGINE_HEALTH_INTERVAL_S``, on its own
        timer so that a long reconcile does not delay it."""
        while True:
            await asyncio.sleep(self.settings.engine_health_interval_s)
            try:
                await self.check_health()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - Redis down: next time
                logger.warning("health check pass failed: %s", e)

    async def check_health(self) -> None:
        """One health check of each RUNNING engine, all at once; then the verdicts.

        A check that got no answer in time while the engine kept sending the proxy response
        bytes passes: the engine is serving, only too busy (or this worker's loop too slow)
        to answer /health within the timeout. Withdrawing its route then would hold every
        new request in the routers until a later check, on an engine that works (it did,
        with 1,000 streams on a shared core: docs/performance.md). An error answer, a
        refused connection, or silence without traffic still count as failures."""
        insts = [i for i in self.instances.values()
                 if i.state is S.RUNNING and not i.busy and i.engine is not None]
        began = time.monotonic()
        results = await asyncio.gather(
            *(i.engine.health_status(self.flows.client) for i in insts
              if i.engine is not None))
        async with self._lock:
            for inst, result in zip(insts, results, strict=True):
                # Skip what changed while we waited (stopped, failed, started to sleep).
                if self.instances.get(inst.alias) is inst and inst.state is S.RUNNING \
                        and not inst.busy:
                    ok = result is True or (result is None and self._serving_since(inst, began))
                    await self._health_verdict(inst, ok)

    def _serving_since(self, inst: Instance, t: float) -> bool:
        """Whether ``inst``'s engine sent the proxy response bytes after ``t``."""
        if self.traffic is None or inst.engine is None:
            return False
        if self.traffic(inst.engine.base_url) < t:
            return False
        logger.debug("%s: engine health check timed out while it serves: counted as passing",
                    inst.alias)
        return True

    async def _health_verdict(self, inst: Instance, ok: bool) -> None:
        """The first failed check takes the route away at once; ``ENGINE_HEALTH_FAILURES``
        in a row fail the instance (restarted after the back-off); a pass brings it back."""
        if ok:
            if inst.health_failures:
                logger.info("%s: engine health check passes again", inst.alias)
                inst.health_failures, inst.note = 0, ""
                await self.life.sync(inst)
            return
        inst.health_failures += 1
        limit = self.settings.engine_health_failures
        lost = inst.engine.lost if inst.engine is not None else None
        if inst.health_failures >= limit:
            why = f"engine health check failed {inst.health_failures} times in a row"
            self._run(inst, self.flows.fail(inst, f"{why}: {lost}" if lost else why))
        elif inst.health_failures == 1 or (lost and lost not in inst.note):
            inst.note = "engine health check failing: withdrawn from the routes"
            if lost:  # the cause, once known (the first failure may come before it)
                inst.note += f" ({lost})"
            logger.warning("%s: %s", inst.alias, inst.note)
            await self.life.sync(inst)

    # ------------------------------------------------------------------ stop
    async def _stop(self, alias: str) -> None:
        """Withdraw the route (with a STOPPING record), stop the engine, delete the record.
        The instance is forgotten only once Redis has all of it: when a write fails it stays
        here, STOPPING, and the next pass tries again (a stale route cannot outlive it)."""
        inst = self.instances[alias]
        if inst.task is not None and not inst.task.done():
            inst.task.cancel()
            await asyncio.gather(inst.task, return_exceptions=True)
        if inst.state is not S.STOPPING:
            try:
                # Routers must stop choosing this replica before the engine goes away.
                await self.life.transition(inst, S.STOPPING)
            finally:
                if inst.engine is not None:
                    code = await inst.engine.stop(self.settings.engine_stop_grace_s)
                    logger.info("stopped %s (exit code %s)", alias, code)
                self._releasing[alias] = inst.engine
        elif inst.unsynced:
            await self.life.sync(inst)
        await self.store.delete_instance(alias, self.worker_id)
        del self.instances[alias]
        self._reported.pop(alias, None)
        self._loads.pop(alias, None)

    async def republish(self, assigned: set[str]) -> None:
        """Write the instance records and routes of ``assigned`` again (after Redis lost them
        or our heartbeat lapsed)."""
        for inst in list(self.instances.values()):
            if inst.alias not in assigned or inst.state is S.STOPPING:
                continue
            await self.life.sync(inst)

    async def stop_all(self) -> None:
        async with self._lock:
            for alias in list(self.instances):
                try:
                    await self._stop(alias)
                except Exception:  # Redis may be gone; the engine is stopped
                    logger.exception("could not record the stop of %s", alias)
            self.flows.sockets.close()
