"""The worker's control loops: register, heartbeat, and reconcile assigned instances."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from typing import Any

import httpx

from services.worker.assignments import HINTED_POLL_S, AssignmentReader, relevant
from services.worker.engines.vllm import VllmDriver
from services.worker.gpu import GpuInventory, account
from services.worker.orphans import sweep
from services.worker.ownership import ORPHAN_GRACE_S, Launcher, Owner
from services.worker.prefetch import Weights
from services.worker.supervisor import Supervisor, Wanted
from shared.events import Nudger
from shared.http import auth_headers
from shared.models import GpuInfo, Heartbeat, WorkerRegistration, cap_gpus
from shared.pace import MAX_PACE, BeatPace, pool_pace
from shared.settings import WorkerSettings
from shared.store import Store

logger = logging.getLogger(__name__)

VERSION = "0.1.0"


class Agent:
    def __init__(
        self,
        store: Store,
        settings: WorkerSettings,
        supervisor: Supervisor,
        gpus: GpuInventory,
        nudger: Nudger,
        client: httpx.AsyncClient,
        weights: Weights | None = None,
    ) -> None:
        self.weights = weights
        # What the last acknowledged heartbeat reported, field by field: a beat carries only
        # what changed (most are a bare refresh of the alive key, the cheapest for Redis),
        # and everything every RESYNC_S (a record edited or lost meanwhile is repaired).
        self._sent: dict[str, Any] = {}
        self._full_due = 0.0
        # Heartbeats paced to the pool's size (shared/pace.py), learnt at full beats.
        self.pace = BeatPace()
        self.store = store
        self.settings = settings
        self.supervisor = supervisor
        self.gpus = gpus
        self.nudger = nudger
        self.client = client
        self._registered = False
        self._flags_reported = False
        self._preparing: asyncio.Future[list[None]] | None = None
        self.assignments = AssignmentReader(
            store, settings.worker_id, settings.resync_s,
            HINTED_POLL_S if settings.events_enabled else 0.0)
        # Set by hints that may change what runs here (not by every hint of the pool), and
        # by anything after which the cached assignments may be stale: a failed pass or
        # heartbeat (Redis unreachable meanwhile), a lapsed heartbeat, a stall of this
        # process (SIGSTOP, a frozen VM) long enough for the scheduler to have moved them.
        self._hinted = True
        self._wake = asyncio.Event()
        self._pass_at = time.monotonic()
        nudger.on_hint(self._on_hint)

    def _on_hint(self, hint: dict[str, Any]) -> None:
        if relevant(hint, self.worker_id):
            self._hinted = True
            self._wake.set()

    @property
    def worker_id(self) -> str:
        return self.settings.worker_id

    def read_gpus(self) -> tuple[list[GpuInfo], str]:
        gpus, message = self.gpus.read()
        sup = self.supervisor
        # Capped to the record bounds the manager and every reader rely on (shared.models).
        return cap_gpus(account(gpus, sup.engine_pgids(), sup.reserved_by_gpu()), message)

    def registration(self) -> WorkerRegistration:
        gpus, message = self.read_gpus()
        return WorkerRegistration(
            worker_id=self.worker_id,
            url=self.supervisor.url,
            engines=sorted(self.supervisor.drivers),
            gpus=gpus,
            gpu_message=message,
            version=VERSION,
            max_cpu_engines=self.settings.max_cpu_engines,
        )

    def report(self) -> dict[str, Any]:
        """Everything a heartbeat can report, as of now."""
        gpus, message = self.read_gpus()
        now: dict[str, Any] = {"gpus": gpus, "gpu_message": message,
                               "load": {"instances": float(len(self.supervisor.instances))}}
        if self.weights is not None and self.weights.models is not None:
            now["local_models"], now["cache_free_mb"] = self.weights.models, self.weights.free_mb
        return now

    def heartbeat_body(self, now: dict[str, Any], full: bool) -> Heartbeat:
        """The fields of ``now`` that changed since the last acknowledged beat (all when
        ``full``); the rest None, which the store leaves as they are."""
        return Heartbeat.model_validate(
            {k: v for k, v in now.items() if full or self._sent.get(k, None) != v})

    async def register(self) -> None:
        reg = self.registration()
        if self.settings.manager_url:
            r = await self.client.post(
                f"{self.settings.manager_url.rstrip('/')}/workers/register",
                content=reg.model_dump_json(),
                headers={"content-type": "application/json", **self._auth()},
            )
            r.raise_for_status()
            self._paced(_pace_of(r))
            self.pace.landed()
        elif not await self.store.register_worker(reg, self._ttl_s()):
            raise RuntimeError(f"worker id {reg.worker_id} is held by a live worker at another "
                               "URL; retrying until its heartbeat lapses")
        else:
            self.pace.landed()
        logger.info("registered worker %s at %s (engines: %s; %s)", reg.worker_id, reg.url,
                    ", ".join(reg.engines), reg.gpu_message or f"{len(reg.gpus)} GPU(s)")

    def _auth(self) -> dict[str, str]:
        return auth_headers(self.settings.internal_token)

    async def _beat(self) -> bool | None:
        now = self.report()
        full = time.monotonic() >= self._full_due
        known = await self._send_beat(self.heartbeat_body(now, full))
        if known is None:
            self._sent, self._full_due = {}, 0.0  # a new record: report everything again
        else:
            self._sent.update(now)
            if full:
                if not self.settings.manager_url:
                    await self._count_pool()
                self._full_due = time.monotonic() + self.settings.resync_s * self.pace.pace
        return known

    async def _count_pool(self) -> None:
        try:
            workers = await self.store.worker_count()
        except Exception as e:  # noqa: BLE001 - the beat landed: its outcome must count
            logger.warning("counting the pool's workers failed (%s); pace kept", e)
            return
        self._repace(workers)

    def _ttl_s(self) -> float:
        """The TTL of the beat about to be written (direct to Redis), paced."""
        return self.settings.heartbeat_ttl_s * self.pace.pace

    def _repace(self, workers: int) -> None:
        s = self.settings
        pace = pool_pace(workers, s)
        if pace != self.pace.pace:
            logger.info("%d workers in the pool: heartbeats every %.1f s (TTL %.1f s)",
                        workers, s.heartbeat_interval_s * pace, s.heartbeat_ttl_s * pace)
        self._paced(pace)

    def _paced(self, pace: float) -> None:
        """The pace for what follows: the beats, and the safety nets that grow with the pool
        as they do (the full beat and the full re-read every RESYNC_S, and with hints on the
        unhinted version check)."""
        self.pace.pace = pace
        self.assignments.resync_s = self.settings.resync_s * pace
        if self.settings.events_enabled:
            self.assignments.poll_s = HINTED_POLL_S * pace

    async def _send_beat(self, hb: Heartbeat) -> bool | None:
        if not self.settings.manager_url:
            known = await self.store.heartbeat(self.worker_id, hb, self._ttl_s())
            if known is not None:
                self.pace.landed()
            return known
        r = await self.client.post(
            f"{self.settings.manager_url.rstrip('/')}/workers/{self.worker_id}/heartbeat",
            # Fields left out, not null: a manager of an earlier version refuses a null load.
            content=hb.model_dump_json(exclude_none=True),
            headers={"content-type": "application/json", **self._auth()},
        )
        if r.status_code == 404:
            return None
        r.raise_for_status()
        # The manager paces the TTL it writes by its own count of the pool.
        self._paced(_pace_of(r))
        self.pace.landed()
        return not bool(r.json().get("revived"))

    async def heartbeat_once(self) -> None:
        known = await self._beat()
        if known is None:
            if self._registered:
                logger.warning("worker record is gone (Redis restarted?): registering again")
            await self.register()
            self._registered = True
            self._flags_reported = False
            await self._keep_pool_id()
        await self._report_engine_flags()
        if not known:
            # Our heartbeat had lapsed or the record was lost: routes may have been wiped.
            # Only what is still assigned here comes back (the manager may have moved the
            # rest while we were away); publishing more would make routes flap.
            assigned, _ = await self.store.worker_state(self.worker_id)
            await self.supervisor.republish(set(assigned))
            self.assignments.invalidate()
            self._hinted = True
            self._wake.set()

    async def _report_engine_flags(self) -> None:
        """Once the installed vLLM's flags are read, put them in the worker record (again
        after a re-registration): routers check new registrations against them."""
        driver = self.supervisor.drivers.get("vllm")
        if self._flags_reported or not isinstance(driver, VllmDriver) or driver.info is None:
            return
        await self.store.set_engine_flags(self.worker_id, driver.info.version,
                                          sorted(driver.info.flags))
        self._flags_reported = True

    async def heartbeat_loop(self) -> None:
        # Drivers learn what they need (vLLM's flags: seconds) while the worker serves.
        self._preparing = asyncio.gather(*(d.prepare() for d in self.supervisor.drivers.values()))
        try:
            await self._beat_forever()
        finally:
            self._preparing.cancel()
            driver = self.supervisor.drivers.get("vllm")
            if isinstance(driver, VllmDriver):
                driver.end_probe()

    async def weights_loop(self) -> None:
        """Re-read which weights this worker has (a walk of its disks, in a thread)."""
        while self.weights is not None:
            try:
                await self.weights.rescan()
            except OSError as e:
                logger.warning("scanning local model weights failed: %s", e)
            await asyncio.sleep(self.settings.weights_scan_interval_s)

    async def _beat_forever(self) -> None:
        while True:
            failed = False
            try:
                await self.heartbeat_once()
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - keep beating through Redis/manager outages
                logger.warning("heartbeat failed: %s", e)
                self._hinted = True
                failed = True
            # The next beat within the TTL the last one wrote, whatever pace it was written at.
            await asyncio.sleep(self.pace.wait_s(self.settings.heartbeat_interval_s, failed))

    async def recover(self) -> bool:
        """Before any engine starts: learn the pool's id, end engines a dead predecessor of
        this pool left running (services.worker.orphans), and drop its instance records and
        routes (the reconcile loop starts afresh what is assigned). False while Redis does not
        answer: then nothing starts, and the reconcile loop asks again."""
        if self.supervisor.flows.owner is not None:
            return True
        try:
            pool = await self.store.pool_id(uuid.uuid4().hex)
        except Exception as e:  # noqa: BLE001 - Redis down: engines wait for the pool id
            logger.warning("cannot read the pool id (%s); no engine starts until Redis answers", e)
            return False
        owner = Owner(pool, self.worker_id, Launcher.this_process(), self.settings.state_dir)
        grace = min(ORPHAN_GRACE_S, self.settings.engine_stop_grace_s)
        swept = await asyncio.to_thread(sweep, owner, grace)
        try:
            aliases = [m.spec.alias for m in await self.store.list_models()]
            records = await self.store.instances_by_alias(aliases)
            for alias, by_worker in records.items():
                if self.worker_id in by_worker:
                    await self.store.delete_instance(alias, self.worker_id)
            # Logs of models deleted while this worker was down.
            await self.supervisor.forget_deleted(self.supervisor.logged_aliases())
        except Exception as e:  # noqa: BLE001 - Redis down: records are rewritten on start
            logger.warning("could not clear stale instance records: %s", e)
        if swept:
            logger.warning("recovered from a crash: ended %d orphaned engine(s)", len(swept))
        self.supervisor.flows.owner = owner
        logger.info("pool %s; engines of worker %s are launched by process %s", pool,
                    self.worker_id, owner.launcher)
        return True

    async def _keep_pool_id(self) -> None:
        """After re-registering (Redis flushed?): put our pool id back if none is there."""
        owner = self.supervisor.flows.owner
        if owner is not None and await self.store.pool_id(owner.pool) != owner.pool:
            logger.warning("the pool id in Redis changed from %s: a restart of this worker "
                           "will not sweep the engines it runs now", owner.pool)

    async def wanted(self) -> tuple[Wanted, set[str]]:
        """What is assigned here (with each model), and the aliases reserved in the ledger;
        read again from Redis only when it changed (:mod:`services.worker.assignments`)."""
        now = time.monotonic()
        stalled = now - self._pass_at > (self.settings.reconcile_interval_s
                                         + self.settings.heartbeat_interval_s)
        self._pass_at = now
        hinted, self._hinted = self._hinted or stalled, False
        try:
            snap = await self.assignments.current(hinted)
        except BaseException:
            self._hinted |= hinted  # not read: the hint still counts at the next pass
            raise
        assigned, unreadable = snap.assigned, snap.unreadable
        wanted = {a: (assigned[a], m) for a, m in snap.models.items()}
        # A model whose record does not parse (reported by the store) keeps what runs here,
        # with the spec it started with: a corrupt record must not stop a serving engine.
        for a in unreadable:
            inst = self.supervisor.instances.get(a)
            if inst is not None:
                wanted[a] = (assigned[a], inst.model)
        return wanted, set(snap.reserved)

    async def reconcile_loop(self) -> None:
        while True:
            try:
                if await self.recover():
                    await self.supervisor.reconcile(*await self.wanted())
            except asyncio.CancelledError:
                raise
            except Exception as e:  # noqa: BLE001 - converge on the next pass
                logger.warning("reconcile failed: %s", e)
                self._hinted = True
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._wake.wait(), self.settings.reconcile_interval_s)
            self._wake.clear()


def _pace_of(r: httpx.Response) -> float:
    """The pace a manager wrote the TTL with (1 from a manager that does not pace)."""
    try:
        pace = float(r.json().get("pace", 1.0))
    except (ValueError, TypeError, AttributeError, OverflowError):
        return 1.0
    return min(pace, MAX_PACE) if pace >= 1.0 else 1.0  # NaN: 1
