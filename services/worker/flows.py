"""The transitions of one instance: start, warm-up, sleep, wake, failure.

Run only by the supervisor, one at a time per instance. Every state change goes through
:class:`services.worker.lifecycle.Lifecycle`, which writes the record and the route together:
a route is published only once the engine has answered a warm-up request, and withdrawn
before the engine stops serving.
"""

from __future__ import annotations

import asyncio
import logging
import socket
import time
from collections.abc import Callable
from pathlib import Path

import httpx

from services.worker.engines.base import (
    EngineDriver,
    EngineExited,
    EngineProcess,
    EngineSockets,
)
from services.worker.engines.environment import parse_passthrough
from services.worker.instance import Instance, host_ram_mb
from services.worker.lifecycle import Lifecycle
from services.worker.metrics import WorkerMetrics
from services.worker.ownership import ORPHAN_GRACE_S, KeeperOptions, Owner
from shared.engine_policy import PolicyError, Sandbox, check_sandbox
from shared.models import InstanceState
from shared.settings import WorkerSettings
from shared.store import Store

logger = logging.getLogger(__name__)

S = InstanceState
_SLEEP_TIMEOUT_S = 300.0
_DRAIN_TIMEOUT_S = 30.0


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Flows:
    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        drivers: dict[str, EngineDriver],
        client: httpx.AsyncClient,
        ram_in_use: Callable[[], int],
        metrics: WorkerMetrics | None = None,
    ) -> None:
        self.store = store
        self.metrics = metrics
        self.settings = settings
        self.drivers = drivers
        self.client = client
        self.ram_in_use = ram_in_use
        self.worker_id = settings.worker_id
        self.url = settings.advertised_url()
        self.life = Lifecycle(store, self.worker_id, self.url)
        # Set once the worker knows its pool (services.worker.agent); engines start after.
        self.owner: Owner | None = None
        self.keeping = keeper_options(settings)
        self.sandbox = Sandbox.from_settings(settings.allow_trust_remote_code,
                                             settings.model_roots)
        self.sockets = EngineSockets()  # removed by Supervisor.stop_all
        self._on_ports: set[str] = set()  # engine kinds said to be on ports

    def _socket_for(self, engine: str, driver: EngineDriver) -> str | None:
        """A Unix socket's path for a new engine, or None: on a loopback port (said once
        per engine kind when ENGINE_SOCKETS=unix asked otherwise: any local user reaches it)."""
        if self.settings.engine_sockets != "unix":
            return None
        if driver.unix_socket():
            return self.sockets.new_path()
        if engine not in self._on_ports:
            self._on_ports.add(engine)
            logger.warning("engine %s cannot serve on a Unix socket here (ENGINE_SOCKETS=unix): "
                           "it listens on a loopback port, which every local user can reach",
                           engine)
        return None

    def log_path(self, alias: str) -> Path:
        return self.settings.state_dir / self.worker_id / f"{alias}.log"

    async def publish(self, inst: Instance) -> None:
        """The record as it is now (ports, counts, notes); the state and route are unchanged."""
        await self.life.record_only(inst)

    # ------------------------------------------------------------------ start
    async def start(self, inst: Instance) -> None:
        spec = inst.model.spec
        inst.error, inst.note, inst.log_tail = "", "", ""
        inst.started_at = time.time()
        inst.draining, inst.health_failures = False, 0
        await self.life.transition(inst, S.STARTING)
        if self.metrics is not None:
            self.metrics.starts.labels(inst.alias, spec.engine).inc()
            if inst.failures:
                self.metrics.restarts.labels(inst.alias, spec.engine).inc()
        log_path = self.log_path(inst.alias)
        try:
            # The operator's sandbox, again here: the spec may predate it, or not come
            # through a router.
            check_sandbox(spec.engine, spec.model_name, spec.extra_args, self.sandbox)
            driver = self.drivers[spec.engine]
            await driver.prepare()
            uds = self._socket_for(spec.engine, driver)
            port = 0 if uds else free_port()
            launch = driver.launch(spec, port, inst.assignment, uds)
        except (KeyError, RuntimeError, PolicyError, OSError) as e:
            await self.fail(inst, f"cannot launch engine '{spec.engine}' here: {e}")
            return
        inst.engine = EngineProcess(launch, port, log_path, uds)
        logger.info("starting %s (%s) on %s: %s", inst.alias, spec.engine,
                    inst.engine.address, launch.argv)
        try:
            if self.owner is None:
                raise EngineExited("this worker does not know its pool yet (Redis unreachable)")
            await inst.engine.start(self.owner, inst.alias, self.keeping)
            await self.publish(inst)
            await inst.engine.wait_ready(self.client, self.settings.engine_start_timeout_s)
        except (EngineExited, TimeoutError) as e:
            await self.fail(inst, str(e))
            return
        inst.healthy_at = time.time()
        await self._warm_and_serve(inst)
        inst.failures = 0
        inst.ready_at = inst.active_at
        await self.store.record_duration(inst.alias, "cold_start", inst.ready_at - inst.started_at)
        if self.metrics is not None:
            self.metrics.cold_start.labels(inst.alias).observe(inst.ready_at - inst.started_at)
        logger.info("%s is serving after %.2fs", inst.alias, inst.ready_at - inst.started_at)

    async def _warm_and_serve(self, inst: Instance) -> None:
        assert inst.engine is not None
        await self.life.transition(inst, S.WARMING)
        t0 = time.monotonic()
        try:
            inst.note = await inst.engine.warm_up(self.client, inst.alias, 120.0)
        except httpx.HTTPError as e:
            inst.note = f"warm-up failed: {type(e).__name__}"
        inst.warmup_s = time.monotonic() - t0
        if self.metrics is not None:
            self.metrics.warmup.labels(inst.alias).observe(inst.warmup_s)
        inst.active_at, inst.sleep_level = time.time(), 0
        inst.health_failures = 0  # a verdict from before a sleep says nothing of the engine now
        await self.life.transition(inst, S.RUNNING)

    # ------------------------------------------------------------------ sleep and wake
    async def sleep(self, inst: Instance) -> None:
        assert inst.engine is not None
        level = inst.model.spec.sleep_level
        if level == 1:
            # Check and claim with no await in between: concurrent sleeps cannot both fit.
            need, used = host_ram_mb(inst), self.ram_in_use()
            budget = self.settings.sleep_ram_budget()
            if used + need > budget:
                await self.stop_for_ram(inst, need, used, budget)
                return
            inst.ram_claim_mb = need
        inst.draining = True
        await self.life.sync(inst)  # routers stop choosing it; the record still says RUNNING
        await self._drain(inst)
        try:
            await inst.engine.sleep(self.client, level, _SLEEP_TIMEOUT_S)
        except (httpx.HTTPError, RuntimeError) as e:
            inst.ram_claim_mb = 0
            await self._transition_failed(inst, f"sleep failed: {e}")
            return
        inst.draining, inst.sleep_level = False, level
        await self.life.transition(inst, S.SLEEPING)
        logger.info("%s is asleep (level %d)", inst.alias, level)

    async def stop_for_ram(self, inst: Instance, need: int, used: int, budget: int) -> None:
        """Level-1 sleep would exceed the host RAM budget: stop the engine instead."""
        assert inst.engine is not None
        inst.note = (f"level-1 sleep refused: needs {need} MB of host RAM, {used} of "
                     f"{budget} MB in use by sleeping instances; stopped instead")
        logger.warning("%s: %s", inst.alias, inst.note)
        engine = inst.engine
        try:
            await self.life.transition(inst, S.STOPPED)  # the route goes first
        finally:
            await engine.stop(self.settings.engine_stop_grace_s)
            inst.engine = None
        await self.publish(inst)

    async def wake(self, inst: Instance) -> None:
        assert inst.engine is not None
        t0 = time.time()
        try:
            await inst.engine.wake(self.client, _SLEEP_TIMEOUT_S)
        except (httpx.HTTPError, RuntimeError) as e:
            await self._transition_failed(inst, f"wake failed: {e}")
            return
        inst.awake_at = time.time()
        inst.ram_claim_mb = 0
        await self._warm_and_serve(inst)
        await self.store.record_duration(inst.alias, "wake", inst.active_at - t0)
        if self.metrics is not None:
            self.metrics.wake.labels(inst.alias).observe(inst.active_at - t0)
        logger.info("%s woke in %.3fs", inst.alias, inst.active_at - t0)

    async def _drain(self, inst: Instance) -> None:
        """Let requests already sent to the engine finish before it sleeps."""
        deadline = time.monotonic() + _DRAIN_TIMEOUT_S
        while inst.inflight > 0 and time.monotonic() < deadline:
            await _tick()

    async def _transition_failed(self, inst: Instance, why: str) -> None:
        assert inst.engine is not None
        if inst.engine.exit_code() is not None:
            await self.fail(inst, f"{why}; engine exited with code {inst.engine.exit_code()}")
            return
        # The engine still serves: keep it in service (its route back, if it was drained)
        # and say what went wrong.
        inst.note, inst.draining = why, False
        logger.warning("%s: %s", inst.alias, why)
        await self.life.sync(inst)

    # ------------------------------------------------------------------ failure
    async def fail(self, inst: Instance, why: str) -> None:
        """FAILED with ``why``: the route goes in the same write, then the engine is stopped
        (even when Redis is down) and retried after the back-off."""
        inst.ram_claim_mb, inst.draining = 0, False
        inst.failures += 1
        if self.metrics is not None:
            self.metrics.failures.labels(inst.alias).inc()
        backoff = self.settings.engine_retry_base_s * 2 ** (inst.failures - 1)
        inst.retry_at = time.time() + min(backoff, self.settings.engine_retry_max_s)
        inst.error = why
        if inst.engine is not None:
            # In the FAILED record itself: readers saw it without its log tail until the
            # engine was stopped and the record written again.
            inst.log_tail = inst.engine.log_tail()
        try:
            await self.life.transition(inst, S.FAILED)
        finally:
            if inst.engine is not None:
                await inst.engine.stop(self.settings.engine_stop_grace_s)
                inst.log_tail = inst.engine.log_tail()
        logger.error("%s failed: %s\n%s", inst.alias, why, inst.log_tail)
        await self.publish(inst)


def keeper_options(settings: WorkerSettings) -> KeeperOptions:
    return KeeperOptions(
        stop_grace_s=settings.engine_stop_grace_s,
        orphan_grace_s=min(ORPHAN_GRACE_S, settings.engine_stop_grace_s),
        env_passthrough=parse_passthrough(settings.engine_env_passthrough),
    )


async def _tick() -> None:
    await asyncio.sleep(0.02)
