"""The scheduler carries out operators' requests, so one that lands in the middle of a pass
(after the pass read the models, before it wrote) is still honoured by the next pass."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from services.manager.scheduler import Scheduler
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec, WorkerRegistration
from shared.settings import ManagerSettings
from shared.store import Intents, Store


class StopMidPass(Store):
    """A store whose first read of the operators' requests lets an operator's stop land
    first: the pass has read the models (not held) and is about to place the alias."""

    stop_once = True

    async def intents(self, aliases: list[str]) -> dict[str, Intents]:
        if self.stop_once:
            self.stop_once = False
            await self.hold_model("m", "stopped by an operator")
        return await super().intents(aliases)


@pytest.fixture
async def store() -> AsyncIterator[StopMidPass]:
    s = StopMidPass(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"), events=False)
    yield s
    await s.close()


def spec(alias: str = "m", **kw: object) -> ModelSpec:
    return ModelSpec.model_validate({"alias": alias, "model_name": "org/m", "engine": "sim"} | kw)


async def test_stop_landing_mid_pass_wins_on_the_next_pass(store: StopMidPass) -> None:
    await store.register_model(spec())
    await store.register_worker(
        WorkerRegistration(worker_id="w1", url="http://w1:1", engines=["sim"]), 30)
    sched = Scheduler(store, ManagerSettings(manager_id="mgr"), Nudger(store))
    await sched.tick()
    # The pass placed what it had read: the stop came after its read of the models.
    assert "m" in await store.worker_assignments("w1")
    await sched.tick()
    assert await store.worker_assignments("w1") == {}
    await sched.tick()
    assert await store.worker_assignments("w1") == {}


async def test_manual_placement_is_made_and_undone_by_the_scheduler(store: StopMidPass) -> None:
    store.stop_once = False
    await store.register_model(spec(min_replicas=0))
    await store.register_worker(
        WorkerRegistration(worker_id="w1", url="http://w1:1", engines=["sim"]), 30)
    sched = Scheduler(store, ManagerSettings(manager_id="mgr"), Nudger(store))
    await store.request_manual_start("m", "w1")
    await sched.tick()
    placed = await store.worker_assignments("w1")
    assert placed["m"].source == "manual" and placed["m"].epoch == sched.state.epoch
    await store.request_manual_stop("m", "w1")
    await sched.tick()
    assert await store.worker_assignments("w1") == {}
