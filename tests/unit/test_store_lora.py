"""Store parts for adapters and prefetch, against fakeredis."""

from __future__ import annotations

from collections.abc import AsyncIterator

import fakeredis
import pytest

from shared.errors import Conflict
from shared.keys import Keys
from shared.models import AdapterSpec, ModelSpec, WorkerRegistration
from shared.store import Store


@pytest.fixture
async def store() -> AsyncIterator[Store]:
    s = Store(fakeredis.FakeAsyncRedis(decode_responses=True), Keys("t"))
    yield s
    await s.close()


def adapter(alias: str = "a", base: str = "b", path: str = "org/a") -> AdapterSpec:
    return AdapterSpec(alias=alias, base=base, adapter=path)


async def test_adapter_registration_checks_atomically(store: Store) -> None:
    assert await store.register_adapter(adapter()) == "no_base"
    await store.register_model(ModelSpec(alias="b", model_name="org/b", engine="sim"))
    assert await store.register_adapter(adapter()) == "created"
    assert await store.register_adapter(adapter()) == "same"
    with pytest.raises(Conflict):
        await store.register_adapter(adapter(path="org/other"))
    with pytest.raises(Conflict):
        await store.register_adapter(adapter(alias="b"))  # a model's alias
    assert list(await store.list_adapters()) == ["a"]
    assert await store.get_adapter("a") == adapter()
    assert await store.is_adapter("a") and not await store.is_adapter("b")
    await store.r.hset(store.k.adapters, "bad", "{not json")
    assert list(await store.list_adapters()) == ["a"]  # the bad one is skipped, reported
    assert any(p["key"] == store.k.adapters for p in store.problems.since(0))
    await store.record_adapter_load("a", 0.5)
    await store.record_adapter_load("a", 0.25)
    await store.record_adapter_eviction("a")
    assert await store.adapter_stats() == {"a": {"loads": 2, "load_s": 0.75, "evictions": 1}}
    assert await store.delete_adapter("a") is True
    assert await store.delete_adapter("a") is False
    assert await store.adapter_stats() == {}


async def test_loaded_sets_per_worker(store: Store) -> None:
    await store.set_lora_loaded("b", "w1", ["x", "y"])
    await store.set_lora_loaded("b", "w2", ["y"])
    await store.r.hset(store.k.lora_loaded("b"), "w3", '{"x": 1}')
    assert await store.lora_loaded(["b", "c"]) == {
        "b": {"w1": frozenset({"x", "y"}), "w2": frozenset({"y"})}, "c": {}}
    await store.set_lora_loaded("b", "w1", [])
    assert set((await store.lora_loaded(["b"]))["b"]) == {"w2"}


async def test_prefetch_requests_progress_and_deletion(store: Store) -> None:
    await store.register_model(ModelSpec(alias="m", model_name="org/m", engine="sim"))
    await store.register_worker(WorkerRegistration(worker_id="w1", url="http://x:1"), 5)
    await store.request_prefetch("m", "org/m", ["w1"])
    assert await store.prefetch_requests("w1") == {"m": "org/m"}
    assert (await store.prefetch_status(["m"]))["m"]["w1"]["state"] == "queued"
    await store.set_prefetch_status("m", "w1", {"state": "failed", "error": "why"},
                                    finished=True)
    assert await store.prefetch_requests("w1") == {}
    assert (await store.prefetch_status(["m"]))["m"]["w1"]["error"] == "why"
    await store.request_prefetch("m", "org/m", ["w1"])
    await store.set_lora_loaded("m", "w1", ["x"])
    assert await store.delete_model("m") is True
    assert await store.prefetch_requests("w1") == {}
    assert await store.prefetch_status(["m"]) == {}
    assert await store.lora_loaded(["m"]) == {"m": {}}
