"""Holding requests for a model that has no serving replica, until one serves or time is up.

A held request takes a place in the model's cluster-wide queue (bounded: beyond it, 429) and
keeps a *demand* key alive in Redis; the scheduler (one leader for the whole pool) turns demand
into exactly one wake or placement, however many routers and requests wait. Every router
learns of the new replica through its route table and lets its own requests through.

Within a router, the held requests of one alias share one :class:`AliasWait`: one demand
refresh and one placement check per interval for all of them (each request polled Redis on
its own, so 1,000 held requests cost 100 times what 10 did), and they wake together on the
route table's change event.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
import uuid

from redis.exceptions import RedisError

from services.router.routes import RouteTable
from shared.errors import ApiError, NoCapacity, QueueFull, StoreUnavailable
from shared.models import MANUAL_REFUSED
from shared.settings import RouterSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)
# Releases under way from callbacks (Ticket.release_soon).
_releasing: set[asyncio.Task[None]] = set()

_DEMAND_TTL_S = 10.0
_DEMAND_REFRESH_S = 2.0
_REASON_CHECK_S = 1.0


class AliasWait:
    """What this router's held requests for one alias share: the demand they keep alive and
    the scheduler's verdict, each refreshed at most once per interval for all of them."""

    def __init__(self, holder: Holder, alias: str) -> None:
        self.holder = holder
        self.alias = alias
        self.tickets = 0
        now = time.monotonic()
        self.demanded_at = now - _DEMAND_REFRESH_S  # the first request asks at once
        self.checked_at = now
        # The scheduler's reason the alias cannot be placed, while it cannot.
        self.unplaceable: str | None = None
        self._busy = False
        self.failing_since: float | None = None  # Redis refreshes failing since then

    async def demand(self) -> None:
        """Keep the demand key alive (it has a TTL), once per interval for every request."""
        self.demanded_at = time.monotonic()
        await self.holder.store.want(self.alias, _DEMAND_TTL_S)
        self.failing_since = None

    async def poll(self) -> None:
        """Refresh the demand and the verdict if their interval passed; one request at a time
        does it, the others go on waiting."""
        if self.failing_since is not None \
                and time.monotonic() - self.failing_since >= _DEMAND_TTL_S:
            # Every held request of the alias ends now, not one a refresh.
            raise StoreUnavailable("the pool's state store (Redis) has been unavailable "
                                   f"for {_DEMAND_TTL_S:.0f} s while this request waited "
                                   "for its model; retry")
        if self._busy:
            return
        self._busy = True
        try:
            now = time.monotonic()
            if now - self.demanded_at >= _DEMAND_REFRESH_S:
                await self.demand()
            if now - self.checked_at >= _REASON_CHECK_S:
                self.checked_at = now
                self.unplaceable = await self._unplaceable()
                self.failing_since = None
        except RedisError as e:
            # One failed refresh is no reason to drop the held requests: the demand key
            # outlives it and the next poll tries again. Once Redis has been away as long as
            # the demand lives, nothing will start the model: the wait ends (503).
            now = time.monotonic()
            if self.failing_since is None:
                self.failing_since = now
                logger.warning("held requests for %s: Redis refresh failed (%s); still "
                               "waiting", self.alias, e)
            if now - self.failing_since >= _DEMAND_TTL_S:
                raise
        finally:
            self._busy = False

    async def _unplaceable(self) -> str | None:
        store = self.holder.store
        reason = await store.placement_reason(self.alias)
        if reason and not reason.startswith(MANUAL_REFUSED) \
                and not await store.instances_of(self.alias):
            return reason
        return None


class Ticket:
    """One held request: its place in the queue and its share of the alias's wait."""

    def __init__(self, holder: Holder, model: StoredModel, member: str, shared: AliasWait
                 ) -> None:
        self.holder = holder
        self.model = model
        self.alias = model.spec.alias
        self.member = member
        self.shared = shared
        self.started = time.monotonic()
        self.deadline = self.started + model.spec.cold_start_timeout_s
        self.released = False

    @property
    def remaining(self) -> float:
        return max(0.0, self.deadline - time.monotonic())

    async def wait(self, up_to_s: float) -> bool:
        """True once a replica serves; False after ``up_to_s`` (or at the deadline).

        Raises :class:`NoCapacity` when the scheduler says the model cannot be placed.
        """
        table = self.holder.table
        until = min(self.deadline, time.monotonic() + up_to_s)
        while not table.replicas(self.alias):
            now = time.monotonic()
            if now >= until:
                return False
            await self.shared.poll()
            if self.shared.unplaceable is not None:
                raise NoCapacity(
                    f"model '{self.alias}' cannot be placed: {self.shared.unplaceable}",
                    retry_after_s=self.holder.settings.no_replica_retry_after_s)
            await table.changed(min(until - now, _REASON_CHECK_S))
        return True

    def release_soon(self) -> None:
        """:meth:`release` from a callback that cannot wait (an answer's end, also when its
        task was cancelled): the queue entry is left in a task of its own."""
        if not self.released:
            task = asyncio.get_running_loop().create_task(self.release())
            _releasing.add(task)  # a task nobody holds may be collected before it runs
            task.add_done_callback(_releasing.discard)

    async def release(self) -> None:
        if self.released:
            return
        self.released = True
        self.holder.leave(self.shared)
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
        self.waits: dict[str, AliasWait] = {}

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
        shared = self.waits.get(alias)
        if shared is None:
            shared = self.waits[alias] = AliasWait(self, alias)
        shared.tickets += 1
        ticket = Ticket(self, model, member, shared)
        try:
            if time.monotonic() - shared.demanded_at >= _DEMAND_REFRESH_S:
                await shared.demand()  # else a request of this alias asked just now
        except BaseException:
            await ticket.release()
            raise
        return ticket

    def leave(self, shared: AliasWait) -> None:
        shared.tickets -= 1
        if shared.tickets <= 0 and self.waits.get(shared.alias) is shared:
            del self.waits[shared.alias]

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
