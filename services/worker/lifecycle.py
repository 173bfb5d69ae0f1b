"""The state machine of one engine instance: the only code that sets an instance's state.

Every state change goes through :meth:`Lifecycle.transition`, which checks it against
:data:`TRANSITIONS`, then writes the instance record *and* publishes or withdraws the route in
one Redis transaction (``Store.write_instance``): a record never says FAILED, STOPPING or
SLEEPING while its route still draws traffic, and a route never outlives the record.

The route follows :attr:`Instance.serving` (RUNNING, not draining, health not failing). When
the write fails (Redis down), the local state has still changed (it describes the engine,
which did change) and the instance is marked unsynced: the supervisor writes it again on its
next pass, so Redis converges instead of keeping a stale route for good.
"""

from __future__ import annotations

import logging

from services.worker.instance import Instance
from shared.models import InstanceState
from shared.store import Store

logger = logging.getLogger(__name__)

S = InstanceState

# state -> the states it may move to. STOPPING is terminal: the record is deleted after it.
TRANSITIONS: dict[InstanceState, frozenset[InstanceState]] = {
    S.PENDING: frozenset({S.STARTING, S.FAILED, S.STOPPING}),
    S.STARTING: frozenset({S.WARMING, S.FAILED, S.STOPPING}),
    S.WARMING: frozenset({S.RUNNING, S.FAILED, S.STOPPING}),
    S.RUNNING: frozenset({S.SLEEPING, S.STOPPED, S.FAILED, S.STOPPING}),
    S.SLEEPING: frozenset({S.WARMING, S.FAILED, S.STOPPING}),
    S.STOPPED: frozenset({S.STARTING, S.STOPPING}),
    S.FAILED: frozenset({S.STARTING, S.STOPPING}),
    S.STOPPING: frozenset(),
}


class RefusedTransition(Exception):
    """A state change the table does not allow; nothing was changed or written."""

    def __init__(self, alias: str, old: InstanceState, new: InstanceState) -> None:
        super().__init__(f"instance {alias}: {old.value} -> {new.value} is not allowed")
        self.alias, self.old, self.new = alias, old, new


def allowed(old: InstanceState, new: InstanceState) -> bool:
    return new in TRANSITIONS[old]


class Lifecycle:
    """Changes the state of this worker's instances and publishes each change atomically."""

    def __init__(self, store: Store, worker_id: str, url: str) -> None:
        self.store = store
        self.worker_id = worker_id
        self.url = url

    async def transition(self, inst: Instance, new: InstanceState) -> None:
        """Move ``inst`` to ``new``: validate, then write record and route together.
        Raises :class:`RefusedTransition` (logged; nothing changed) or the store's error
        (the state changed locally; the instance stays unsynced until :meth:`sync`)."""
        if not allowed(inst.state, new):
            err = RefusedTransition(inst.alias, inst.state, new)
            logger.error("refused: %s", err)
            raise err
        inst.state = new
        await self.sync(inst)

    async def sync(self, inst: Instance) -> None:
        """Write the record and the route as the instance is now (after a failed write, a
        drain or a health verdict). Marks it unsynced when the write fails, then raises."""
        inst.unsynced = True
        await self.store.write_instance(inst.alias, self.worker_id, inst.record(),
                                        self.url if inst.serving else None)
        inst.unsynced = False

    async def record_only(self, inst: Instance) -> None:
        """Write the record alone (request accounting): routes untouched, no routes version
        bump, so routers do not re-read routes for every change of an in-flight count."""
        await self.store.put_instance(inst.alias, self.worker_id, inst.record())
