"""The sole owner of this worker's engine instances.

Only the supervisor starts, watches and stops engine processes; the API and the agent ask it
(through :meth:`Supervisor.reconcile`). It writes the observed state of each instance and its
route to Redis, and withdraws a route *before* stopping the engine behind it.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from dataclasses import dataclass, field

import httpx

from services.worker.engines.base import EngineDriver, EngineExited, EngineProcess
from shared.models import Assignment, InstanceState
from shared.settings import WorkerSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)

S = InstanceState


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Instance:
    alias: str
    assignment: Assignment
    model: StoredModel
    state: InstanceState = S.PENDING
    engine: EngineProcess | None = None
    error: str = ""
    log_tail: str = ""
    failures: int = 0
    retry_at: float = 0.0
    started_at: float = field(default_factory=time.time)
    ready_at: float = 0.0
    task: asyncio.Task[None] | None = None

    def record(self) -> dict[str, str]:
        e = self.engine
        return {
            "state": self.state.value,
            "engine": self.model.spec.engine,
            "model_name": self.model.spec.model_name,
            "port": str(e.port if e else 0),
            "pid": str(e.pid if e and e.pid else 0),
            "gpus": ",".join(str(g) for g in self.assignment.gpus),
            "source": self.assignment.source,
            "epoch": str(self.assignment.epoch),
            "started_at": repr(self.started_at),
            "ready_at": repr(self.ready_at),
            "updated_at": repr(time.time()),
            "error": self.error,
            "log_tail": self.log_tail,
            "failures": str(self.failures),
            "retry_at": repr(self.retry_at),
        }


Wanted = dict[str, tuple[Assignment, StoredModel]]


class Supervisor:
    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        drivers: dict[str, EngineDriver],
        client: httpx.AsyncClient,
    ) -> None:
        self.store = store
        self.settings = settings
        self.drivers = drivers
        self.client = client
        self.instances: dict[str, Instance] = {}
        self.url = settings.advertised_url()
        self._lock = asyncio.Lock()

    @property
    def worker_id(self) -> str:
        return self.settings.worker_id

    def serving(self, alias: str) -> EngineProcess | None:
        inst = self.instances.get(alias)
        return inst.engine if inst is not None and inst.state is S.RUNNING else None

    async def reconcile(self, wanted: Wanted) -> None:
        """Converge local instances to ``wanted`` (alias -> assignment and model)."""
        async with self._lock:
            for alias, inst in list(self.instances.items()):
                want = wanted.get(alias)
                if want is None or want[1].version != inst.model.version:
                    await self._stop(alias)
            for alias, (a, m) in wanted.items():
                current = self.instances.get(alias)
                if current is None:
                    self._launch(Instance(alias, a, m))
                else:
                    await self._check(current)

    async def _check(self, inst: Instance) -> None:
        if inst.state is S.RUNNING and inst.engine and inst.engine.exit_code() is not None:
            code = inst.engine.exit_code()
            await self._failed(inst, f"engine exited with code {code} while serving")
        elif inst.state is S.FAILED and time.time() >= inst.retry_at:
            logger.info("retrying %s (failure %d)", inst.alias, inst.failures)
            self._launch(inst)

    def _launch(self, inst: Instance) -> None:
        self.instances[inst.alias] = inst
        inst.task = asyncio.create_task(self._start_guarded(inst))

    async def _start_guarded(self, inst: Instance) -> None:
        try:
            await self._start(inst)
        except asyncio.CancelledError:
            raise
        except Exception as e:
            logger.exception("start of %s failed", inst.alias)
            inst.state, inst.error = S.FAILED, f"start failed: {e}"
            inst.retry_at = time.time() + self.settings.engine_retry_base_s
            if inst.engine is not None:
                await inst.engine.stop(self.settings.engine_stop_grace_s)

    async def _start(self, inst: Instance) -> None:
        spec = inst.model.spec
        inst.state, inst.error, inst.log_tail = S.STARTING, "", ""
        inst.started_at = time.time()
        port = free_port()
        log_path = self.settings.state_dir / self.worker_id / f"{inst.alias}.log"
        try:
            launch = self.drivers[spec.engine].launch(spec, port, inst.assignment.gpus)
        except (KeyError, RuntimeError) as e:
            await self._failed(inst, f"cannot launch engine '{spec.engine}' here: {e}")
            return
        inst.engine = EngineProcess(launch, port, log_path)
        logger.info("starting %s (%s) on port %d: %s", inst.alias, spec.engine, port, launch.argv)
        inst.engine.start()
        await self._publish(inst)
        try:
            await inst.engine.wait_ready(self.client, self.settings.engine_start_timeout_s)
        except (EngineExited, TimeoutError) as e:
            await self._failed(inst, str(e))
            return
        inst.state, inst.ready_at, inst.failures = S.RUNNING, time.time(), 0
        await self._publish(inst)
        await self.store.set_route(inst.alias, self.worker_id, self.url)
        logger.info("%s is serving after %.2fs", inst.alias, inst.ready_at - inst.started_at)

    async def _failed(self, inst: Instance, why: str) -> None:
        await self.store.set_route(inst.alias, self.worker_id, None)
        if inst.engine is not None:
            await inst.engine.stop(self.settings.engine_stop_grace_s)
            inst.log_tail = inst.engine.log_tail()
        inst.failures += 1
        backoff = self.settings.engine_retry_base_s * 2 ** (inst.failures - 1)
        inst.retry_at = time.time() + min(backoff, self.settings.engine_retry_max_s)
        inst.state, inst.error = S.FAILED, why
        logger.error("%s failed: %s\n%s", inst.alias, why, inst.log_tail)
        await self._publish(inst)

    async def _publish(self, inst: Instance) -> None:
        await self.store.put_instance(inst.alias, self.worker_id, inst.record())

    async def _stop(self, alias: str) -> None:
        inst = self.instances.pop(alias)
        if inst.task is not None and not inst.task.done():
            inst.task.cancel()
            await asyncio.gather(inst.task, return_exceptions=True)
        inst.state = S.STOPPING
        try:
            # Routers must stop choosing this replica before the engine goes away.
            await self.store.set_route(alias, self.worker_id, None)
            await self._publish(inst)
        finally:
            if inst.engine is not None:
                code = await inst.engine.stop(self.settings.engine_stop_grace_s)
                logger.info("stopped %s (exit code %s)", alias, code)
        await self.store.delete_instance(alias, self.worker_id)

    async def republish(self) -> None:
        """Write every instance record and route again (after Redis lost them)."""
        for inst in list(self.instances.values()):
            await self._publish(inst)
            if inst.state is S.RUNNING:
                await self.store.set_route(inst.alias, self.worker_id, self.url)

    async def stop_all(self) -> None:
        async with self._lock:
            for alias in list(self.instances):
                try:
                    await self._stop(alias)
                except Exception:
                    logger.exception("could not record the stop of %s", alias)
