"""The router's route table against fakeredis: a route change re-reads only the aliases the
routes log names; anything the log cannot account for reloads everything."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable

import fakeredis
import pytest

from services.router.routes import RouteTable
from shared.events import Nudger
from shared.keys import Keys
from shared.models import ModelSpec, WorkerRegistration
from shared.store import Store

ALIASES = [f"m{i}" for i in range(6)]


class Recording(Store):
    """A store that remembers which aliases each ``all_routes`` call read."""

    reads: list[list[str]]

    async def all_routes(self, aliases: Iterable[str]) -> dict[str, dict[str, str]]:
        names = list(aliases)
        self.reads.append(names)
        return await super().all_routes(names)


@pytest.fixture
async def store() -> AsyncIterator[Recording]:
    s = Recording(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    s.reads = []
    for a in ALIASES:
        await s.register_model(ModelSpec(alias=a, model_name="org/m", engine="sim"))
    for w in ("w1", "w2"):
        await s.register_worker(WorkerRegistration(worker_id=w, url=f"http://{w}:1"), 60)
    for a in ALIASES:
        await s.set_route(a, "w1", "http://w1:1")
    yield s
    await s.close()


async def fresh_table(store: Recording) -> RouteTable:
    table = RouteTable(store, Nudger(store), 1.0)
    await table.refresh()
    store.reads.clear()
    return table


async def test_fresh_router_loads_everything(store: Recording) -> None:
    table = RouteTable(store, Nudger(store), 1.0)
    await table.refresh()
    assert store.reads == [ALIASES]
    assert sorted(table.models) == ALIASES
    assert table.routes == {a: {"w1": "http://w1:1"} for a in ALIASES}
    assert (table.full_reloads, table.partial_reloads) == (1, 0)


async def test_nothing_changed_reads_no_routes(store: Recording) -> None:
    table = await fresh_table(store)
    await table.refresh()
    assert store.reads == []


async def test_one_route_change_reloads_only_that_alias(store: Recording) -> None:
    table = await fresh_table(store)
    await store.set_route("m3", "w2", "http://w2:1")
    await table.refresh()
    assert store.reads == [["m3"]]
    assert table.replicas("m3") == {"w1": "http://w1:1", "w2": "http://w2:1"}
    assert table.replicas("m2") == {"w1": "http://w1:1"}
    assert (table.full_reloads, table.partial_reloads) == (1, 1)
    # Several changes between two passes: each named alias once, the others untouched.
    store.reads.clear()
    await store.set_route("m1", "w2", "http://w2:1")
    await store.set_route("m4", "w2", "http://w2:1")
    await store.set_route("m1", "w2", None)
    await table.refresh()
    assert store.reads == [["m1", "m4"]]
    assert table.replicas("m1") == {"w1": "http://w1:1"}
    assert table.replicas("m4") == {"w1": "http://w1:1", "w2": "http://w2:1"}


async def test_deleted_instance_withdraws_the_route(store: Recording) -> None:
    table = await fresh_table(store)
    await store.set_route("m2", "w2", "http://w2:1")
    await table.refresh()
    store.reads.clear()
    await store.delete_instance("m2", "w2")
    await table.refresh()
    assert store.reads == [["m2"]]
    assert table.replicas("m2") == {"w1": "http://w1:1"}
    await store.delete_instance("m2", "w1")
    await table.refresh()
    assert table.replicas("m2") == {}


async def test_trimmed_log_falls_back_to_full_reload(store: Recording) -> None:
    table = await fresh_table(store)
    await store.set_route("m1", "w2", "http://w2:1")
    await store.set_route("m5", "w2", "http://w2:1")
    await store.r.xtrim(store.k.routes_log, maxlen=1, approximate=False)  # m1 is gone
    await table.refresh()
    assert store.reads == [ALIASES]
    assert table.replicas("m1") == {"w1": "http://w1:1", "w2": "http://w2:1"}
    assert table.replicas("m5") == {"w1": "http://w1:1", "w2": "http://w2:1"}
    assert (table.full_reloads, table.partial_reloads) == (2, 0)
    # Back on the log from there.
    store.reads.clear()
    await store.set_route("m0", "w2", "http://w2:1")
    await table.refresh()
    assert store.reads == [["m0"]]


async def test_version_bump_without_log_entry_falls_back(store: Recording) -> None:
    """A writer that changes routes and bumps the version without logging (older code, a dead
    worker's cleanup) must still be seen, even when logged changes come with it."""
    table = await fresh_table(store)
    await store.r.hset(store.k.routes("m4"), "w2", "http://w2:1")
    await store.r.incr(store.k.routes_version)
    await store.set_route("m1", "w2", "http://w2:1")
    await table.refresh()
    assert store.reads == [ALIASES]
    assert table.replicas("m4") == {"w1": "http://w1:1", "w2": "http://w2:1"}
    assert table.replicas("m1") == {"w1": "http://w1:1", "w2": "http://w2:1"}


async def test_log_ahead_of_version_falls_back(store: Recording) -> None:
    """More entries than the version moved (a flushed or failed-over Redis): reload all."""
    table = await fresh_table(store)
    await store.r.xadd(store.k.routes_log, {"alias": "m1"})
    await store.set_route("m2", "w2", "http://w2:1")
    await table.refresh()
    assert store.reads == [ALIASES]
    # And a version that went back.
    store.reads.clear()
    await store.r.set(store.k.routes_version, "1")
    await table.refresh()
    assert store.reads == [ALIASES]


async def test_entry_without_alias_falls_back(store: Recording) -> None:
    table = await fresh_table(store)
    async with store.r.pipeline(transaction=True) as pipe:
        pipe.incr(store.k.routes_version)
        pipe.xadd(store.k.routes_log, {"other": "x"})
        await pipe.execute()
    await table.refresh()
    assert store.reads == [ALIASES]


async def test_model_change_reloads_only_that_model(store: Recording) -> None:
    """A register or delete re-reads that model and its routes, not the whole table (1,000
    registrations took 43 s when each reloaded everything)."""
    table = await fresh_table(store)
    await store.delete_model("m3")
    await table.refresh()
    assert store.reads == []  # nothing of m3 is left to read
    assert "m3" not in table.routes and "m3" not in table.models
    assert sorted(table.models) == [a for a in ALIASES if a != "m3"]
    await store.register_model(ModelSpec(alias="new", model_name="org/m", engine="sim"))
    await store.set_route("new", "w1", "http://w1:1")
    await table.refresh()
    assert store.reads == [["new"]]
    assert table.replicas("new") == {"w1": "http://w1:1"}
    assert table.replicas("m2") == {"w1": "http://w1:1"}
    assert (table.full_reloads, table.model_reloads) == (1, 2)
    # A hold is a model change too: the model is re-read with it.
    await store.hold_model("m1", "test")
    await table.refresh()
    assert table.models["m1"].hold is not None
    assert table.full_reloads == 1


async def test_models_version_bump_without_log_entry_reloads_everything(
        store: Recording) -> None:
    table = await fresh_table(store)
    await store.r.hset(store.k.model("m2"), "version", "changed-behind-the-log")
    await store.r.incr(store.k.models_version)
    await store.register_model(ModelSpec(alias="new", model_name="org/m", engine="sim"))
    await table.refresh()
    assert store.reads == [sorted([*ALIASES, "new"])]
    assert table.models["m2"].version == "changed-behind-the-log"
    assert "new" in table.models


async def test_route_of_unknown_alias_is_ignored(store: Recording) -> None:
    table = await fresh_table(store)
    await store.set_route("ghost", "w1", "http://w1:1")
    await table.refresh()
    assert store.reads == []
    assert "ghost" not in table.routes


async def test_liveness_is_rechecked_every_pass(store: Recording) -> None:
    table = await fresh_table(store)
    await store.set_route("m1", "w2", "http://w2:1")
    await table.refresh()
    await store.r.delete(store.k.worker_alive("w2"))
    await table.refresh()
    assert table.replicas("m1") == {"w1": "http://w1:1"}
    await store.r.set(store.k.worker_alive("w2"), "1")
    await table.refresh()
    assert table.replicas("m1") == {"w1": "http://w1:1", "w2": "http://w2:1"}


async def test_failed_pass_is_redone(store: Recording, monkeypatch: pytest.MonkeyPatch) -> None:
    """Routes re-read but the pass failed before they were applied (re-reading liveness for
    a worker the new routes brought in): the next pass, with the versions now unchanged,
    must still apply them."""
    table = await fresh_table(store)
    await store.set_route("m1", "w2", "http://w2:1")
    real_alive = store.alive

    async def broken(_: object) -> set[str]:
        raise ConnectionError("redis went away")

    monkeypatch.setattr(store, "alive", broken)
    with pytest.raises(ConnectionError):
        await table.refresh()
    monkeypatch.setattr(store, "alive", real_alive)
    await table.refresh()
    assert table.replicas("m1") == {"w1": "http://w1:1", "w2": "http://w2:1"}
