"""The instance state machine: every allowed and refused transition, each written with its
route in one transaction; and a supervisor that keeps an instance until Redis has its stop."""

from __future__ import annotations

import ast
import asyncio
import itertools
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any, cast

import fakeredis
import httpx
import pytest

from services.worker.instance import Instance
from services.worker.lifecycle import TRANSITIONS, Lifecycle, RefusedTransition, allowed
from services.worker.supervisor import Supervisor
from shared.keys import Keys
from shared.models import Assignment, InstanceState, ModelSpec
from shared.settings import WorkerSettings
from shared.store import Store, StoredModel

S = InstanceState
URL = "http://w1:7000"
PAIRS = list(itertools.product(S, S))


@pytest.fixture
async def server_store() -> AsyncIterator[tuple[fakeredis.FakeServer, Store]]:
    server = fakeredis.FakeServer()
    s = Store(fakeredis.FakeAsyncRedis(server=server, decode_responses=True), Keys("t"),
              events=False)
    yield server, s
    await s.close()


def instance(state: InstanceState) -> Instance:
    spec = ModelSpec.model_validate({"alias": "m", "model_name": "org/m", "engine": "sim"})
    inst = Instance("m", Assignment(alias="m", worker_id="w1"), StoredModel(spec, "v1", 0.0))
    inst.state = state
    return inst


async def seen(store: Store) -> tuple[str | None, str | None, str | None]:
    """(state in the record, this worker's route, routes version) as Redis has them."""
    r = store.r
    got = (await r.hget(store.k.instance("m", "w1"), "state"),
           await r.hget(store.k.routes("m"), "w1"), await r.get(store.k.routes_version))
    return cast(tuple[str | None, str | None, str | None], got)


def test_table_covers_every_state_and_stopping_is_terminal() -> None:
    assert set(TRANSITIONS) == set(S)
    assert TRANSITIONS[S.STOPPING] == frozenset()
    # Only RUNNING serves, and it is reached only through WARMING (after the warm-up).
    assert [s for s in S if allowed(s, S.RUNNING)] == [S.WARMING]
    # Every state but STOPPING can be stopped.
    assert all(allowed(s, S.STOPPING) for s in S if s is not S.STOPPING)


@pytest.mark.parametrize(("old", "new"), [p for p in PAIRS if allowed(*p)])
async def test_allowed_transition_writes_record_and_route_together(
    server_store: tuple[fakeredis.FakeServer, Store], old: InstanceState, new: InstanceState,
) -> None:
    _, store = server_store
    life = Lifecycle(store, "w1", URL)
    # A stale route is there first: only a RUNNING instance may keep one.
    await store.set_route("m", "w1", URL)
    inst = instance(old)
    await life.transition(inst, new)
    state, route, version = await seen(store)
    assert inst.state is new and state == new.value and not inst.unsynced
    assert route == (URL if new is S.RUNNING else None)
    assert version == "2"  # one bump for the set_route above, one for the transition


@pytest.mark.parametrize(("old", "new"), [p for p in PAIRS if not allowed(*p)])
async def test_refused_transition_changes_nothing(
    server_store: tuple[fakeredis.FakeServer, Store], old: InstanceState, new: InstanceState,
    caplog: pytest.LogCaptureFixture,
) -> None:
    _, store = server_store
    inst = instance(old)
    with pytest.raises(RefusedTransition):
        await Lifecycle(store, "w1", URL).transition(inst, new)
    assert inst.state is old
    assert await seen(store) == (None, None, None)
    assert f"{old.value} -> {new.value} is not allowed" in caplog.text


async def test_failed_mark_withdraws_the_route(
    server_store: tuple[fakeredis.FakeServer, Store],
) -> None:
    _, store = server_store
    life = Lifecycle(store, "w1", URL)
    inst = instance(S.WARMING)
    await life.transition(inst, S.RUNNING)
    assert (await seen(store))[:2] == ("RUNNING", URL)
    await life.transition(inst, S.FAILED)
    assert (await seen(store))[:2] == ("FAILED", None)


async def test_draining_or_unhealthy_running_instance_has_no_route(
    server_store: tuple[fakeredis.FakeServer, Store],
) -> None:
    _, store = server_store
    life = Lifecycle(store, "w1", URL)
    inst = instance(S.WARMING)
    await life.transition(inst, S.RUNNING)
    inst.health_failures = 1
    await life.sync(inst)
    assert (await seen(store))[:2] == ("RUNNING", None)
    inst.health_failures = 0
    await life.sync(inst)
    assert (await seen(store))[:2] == ("RUNNING", URL)


async def test_failed_write_leaves_the_instance_unsynced_then_sync_converges(
    server_store: tuple[fakeredis.FakeServer, Store],
) -> None:
    server, store = server_store
    life = Lifecycle(store, "w1", URL)
    inst = instance(S.WARMING)
    await life.transition(inst, S.RUNNING)
    server.connected = False
    with pytest.raises(Exception):  # noqa: B017 - whatever redis-py raises for a lost server
        await life.transition(inst, S.FAILED)
    assert inst.state is S.FAILED and inst.unsynced
    server.connected = True
    await life.sync(inst)
    assert (await seen(store))[:2] == ("FAILED", None) and not inst.unsynced


async def test_stop_keeps_the_instance_until_redis_has_it(
    server_store: tuple[fakeredis.FakeServer, Store], tmp_path: Path,
) -> None:
    """A Redis error while stopping used to forget the instance with its route still
    published, for good. Now the instance stays (STOPPING) and the next pass finishes."""
    server, store = server_store
    settings = WorkerSettings(worker_id="w1", worker_url=URL, state_dir=tmp_path)
    async with httpx.AsyncClient() as client:
        sup = Supervisor(store, settings, {}, client)
        inst = instance(S.WARMING)
        sup.instances["m"] = inst
        await sup.life.transition(inst, S.RUNNING)
        server.connected = False
        await sup.reconcile({})  # unassigned: stop it, but Redis is gone
        assert sup.instances.get("m") is inst and inst.state is S.STOPPING
        server.connected = True
        assert (await seen(store))[:2] == ("RUNNING", URL)  # nothing reached Redis
        await sup.reconcile({})
        assert "m" not in sup.instances
        assert (await seen(store))[:2] == (None, None)
        assert await store.r.smembers(store.k.instances("m")) == set()


def test_nothing_else_sets_an_instance_state() -> None:
    """Only the state machine assigns ``.state`` in the worker (the table is the whole story)."""
    root = Path(__file__).resolve().parents[2] / "services" / "worker"
    setters = []
    for path in root.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if not isinstance(node, ast.Assign):
                continue
            for t in node.targets:
                elts = t.elts if isinstance(t, ast.Tuple) else [t]
                setters += [f"{path.name}:{node.lineno}" for e in elts
                            if isinstance(e, ast.Attribute) and e.attr == "state"]
    assert setters and all(s.startswith("lifecycle.py:") for s in setters), setters


async def test_a_flow_that_raises_fails_the_instance_and_withdraws_its_route(
    server_store: tuple[fakeredis.FakeServer, Store], tmp_path: Path,
) -> None:
    """A transition that raised used to set FAILED in memory only: the record said RUNNING
    and the route kept drawing traffic to an engine being stopped."""
    _, store = server_store
    settings = WorkerSettings(worker_id="w1", worker_url=URL, state_dir=tmp_path)
    async with httpx.AsyncClient() as client:
        sup = Supervisor(store, settings, {}, client)
        inst = instance(S.WARMING)
        sup.instances["m"] = inst
        await sup.life.transition(inst, S.RUNNING)

        async def broken_flow() -> None:
            raise RuntimeError("unexpected")

        sup._run(inst, broken_flow())
        assert inst.task is not None
        await inst.task
        assert inst.state is S.FAILED and "unexpected" in inst.error
        assert (await seen(store))[:2] == ("FAILED", None)


class _Engine:
    """What the health check reads of an engine: its URL and its /health verdict."""

    base_url = "http://127.0.0.1:9"
    record = None
    port = 9
    uds = None
    pid = 0
    lost = None  # the socket file is in place

    def __init__(self, verdict: bool | None) -> None:
        self.verdict = verdict

    async def health_status(self, client: httpx.AsyncClient) -> bool | None:
        return self.verdict


@pytest.mark.parametrize(("verdict", "serving", "withdrawn"), [
    (None, True, False),  # no answer in time, but it streams: busy, keeps its route
    (None, False, True),  # no answer and no traffic: hung
    (False, True, True),  # an error answer counts whatever the traffic
    (True, False, False),
])
async def test_a_busy_engine_keeps_its_route(
    server_store: tuple[fakeredis.FakeServer, Store], tmp_path: Path,
    verdict: bool | None, serving: bool, withdrawn: bool,
) -> None:
    """Under 1,000 streams on a shared core the engine's /health timed out, the worker
    withdrew its route and the routers held every new request for seconds, on an engine
    that was serving all along. A timeout while the proxy gets the engine's bytes passes."""
    _, store = server_store
    settings = WorkerSettings(worker_id="w1", worker_url=URL, state_dir=tmp_path)
    last_bytes: dict[str, float] = {}
    async with httpx.AsyncClient() as client:
        sup = Supervisor(store, settings, {}, client,
                         traffic=lambda url: last_bytes.get(url, 0.0))
        inst = instance(S.WARMING)
        inst.engine = cast(Any, _Engine(verdict))
        sup.instances["m"] = inst
        await sup.life.transition(inst, S.RUNNING)
        assert (await seen(store))[1] == URL

        async def stream_bytes() -> None:  # the proxy relaying the engine's answer meanwhile
            if serving:
                last_bytes[_Engine.base_url] = time.monotonic()

        await asyncio.gather(sup.check_health(), stream_bytes())
        assert inst.health_failures == (1 if withdrawn else 0)
        assert (await seen(store))[1] == (None if withdrawn else URL)
