"""Holding requests for a model that has no serving replica, until one serves or time is up.

A held request takes a place in the model's cluster-wide queue (bounded: beyond it, 429) and
keeps a *demand* key alive in Redis; the scheduler (one leader for the whole pool) turns demand
into exactly one wake or placement, however many routers and requests wait. Every router
learns of the new replica through its route table and lets its own requests through.
"""

from __future__ import annotations

import logging
import math
import time
import uuid

from services.router.routes import RouteTable
from shared.errors import ApiError, NoCapacity, QueueFull
from shared.settings import RouterSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)

_DEMAND_TTL_S = 10.0
_DEMAND_REFRESH_S = 2.0
_REASON_CHECK_S = 1.0


class Ticket:
    """One held request: its place in the queue and the demand it keeps alive."""

    def __init__(self, holder: Holder, model: StoredModel, member: str) -> None:
        self.holder = holder
        self.model = model
        self.alias = model.spec.alias
        self.member = member
        self.started = time.monotonic()
        self.deadline = self.started + model.spec.cold_start_timeout_s
        self._demanded_at = self.started
        self._checked_at = self.started
        self.released = False

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def wait(self, up_to_s: float) -> bool:
        """True once a replica serves; False after ``up_to_s`` (or at the deadline).

        Raises :class:`NoCapacity` when the scheduler says the model cannot be placed.
        """
        table, store = self.holder.table, self.holder.store
        until = min(self.deadline, time.monotonic() + up_to_s)
        while not table.replicas(self.alias):
            now = time.monotonic()
            if now >= until:
                return False
            if now - self._demanded_at >= _DEMAND_REFRESH_S:
                await store.want(self.alias, _DEMAND_TTL_S)
                self._demanded_at = now
            if now - self._checked_at >= _REASON_CHECK_S:
                self._checked_at = now
                await self._fail_if_unplaceable()
            await table.changed(min(until - now, _REASON_CHECK_S))
        return True

    async def _fail_if_unplaceable(self) -> None:
        store = self.holder.store
        reason = await store.placement_reason(self.alias)
        if reason and not await store.instances_of(self.alias):
            raise NoCapacity(f"model '{self.alias}' cannot be placed: {reason}",
                             retry_after_s=self.holder.settings.no_replica_retry_after_s)

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        store = self.holder.store
        try:
            await store.leave_queue(self.alias, self.member)
            await store.record_wait(self.alias, time.monotonic() - self.started)
        except Exception as e:  # noqa: BLE001 - the entry expires on its own
            logger.warning("could not leave the hold queue of %s: %s", self.alias, e)


class Holder:
    def __init__(self, table: RouteTable, store: Store, settings: RouterSettings) -> None:
        self.table = table
        self.store = store
        self.settings = settings

    async def admit(self, model: StoredModel) -> Ticket:
        """Take a place in the model's queue (or raise 429) and ask for the model."""
        alias = model.spec.alias
        member = f"{self.settings.router_id}:{uuid.uuid4().hex}"
        ttl = model.spec.cold_start_timeout_s + 5.0
        if not await self.store.enter_queue(alias, member, ttl, self.settings.hold_queue_max):
            raise QueueFull(
                f"too many requests are waiting for model '{alias}' to start "
                f"(limit {self.settings.hold_queue_max})",
                retry_after_s=await self.retry_after(alias))
        await self.store.want(alias, _DEMAND_TTL_S)
        return Ticket(self, model, member)

    async def retry_after(self, alias: str) -> int:
        """Seconds a client should wait: the model's measured wake or cold-start time."""
        default = self.settings.no_replica_retry_after_s
        try:
            timings = await self.store.timings(alias)
            instances = await self.store.instances_of(alias)
        except Exception:  # noqa: BLE001 - Redis down: the configured default
            return default
        asleep = any(i.get("state") == "SLEEPING" for i in instances.values())
        measured = timings["median_wake_s" if asleep else "median_cold_start_s"]
        return max(1, math.ceil(measured)) if measured else default

    async def timeout_error(self, ticket: Ticket) -> ApiError:
        waited = time.monotonic() - ticket.started
        return NoCapacity(
            f"model '{ticket.alias}' did not start within {waited:.0f}s "
            f"(cold_start_timeout_s={ticket.model.spec.cold_start_timeout_s:g}; "
            f"{await self._instances_detail(ticket.alias)})",
            retry_after_s=await self.retry_after(ticket.alias), code="cold_start_timeout")

    async def _instances_detail(self, alias: str) -> str:
        try:
            instances = await self.store.instances_of(alias)
        except Exception:  # noqa: BLE001 - Redis down: say what we know
            return "state store unreachable"
        if not instances:
            return "no instance yet"
        return "; ".join(
            f"{w}: {i.get('state')}" + (f" ({i['error']})" if i.get("error") else "")
            for w, i in instances.items())
