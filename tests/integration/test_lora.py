"""LoRA adapters as aliases: loaded on demand into the base model's engine, least recently
used evicted at the engine's --max-loras, replicas that hold an adapter preferred, bad input
refused. The simulated engine answers under the adapter's name and logs its loads."""

from __future__ import annotations

import random
import threading
from collections import OrderedDict
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import pytest

from tests.support import (
    Cluster,
    Proc,
    chat,
    engine_address,
    engine_call,
    model_status,
    register,
    wait_until,
)

ADAPTERS = [f"ad{i}" for i in range(6)]
LORA_ARGS = ["--enable-lora", "--max-loras", "2", "--lora-load-delay", "0.05"]


def add_adapter(router: Proc, alias: str, base: str, adapter: str | None = None,
                **extra: Any) -> httpx.Response:
    body = {"alias": alias, "base": base, "adapter": adapter or f"org/{alias}-lora"} | extra
    return httpx.post(f"{router.url}/admin/adapters", json=body, timeout=10)


def engine_stats(router: Proc, alias: str) -> dict[str, dict[str, Any]]:
    """worker -> the simulated engine's counters, LoRA events included."""
    m = model_status(router, alias)
    assert m is not None
    return {i["worker_id"]: engine_call(engine_address(i), "GET", "/sim/stats").json()
            for i in m["instances"] if i["state"] == "RUNNING"}


def lru_events(sequence: list[str], slots: int) -> tuple[list[list[str]], set[str]]:
    """The loads and unloads an LRU cache of ``slots`` makes for ``sequence`` (requests one
    at a time), and what it holds at the end: what the pool must do."""
    cache: OrderedDict[str, None] = OrderedDict()
    events = []
    for name in sequence:
        if name in cache:
            cache.move_to_end(name)
            continue
        if len(cache) >= slots:
            victim, _ = cache.popitem(last=False)
            events.append(["unload", victim])
        cache[name] = None
        events.append(["load", name])
    return events, set(cache)


def ask(router: Proc, model: str) -> httpx.Response:
    return chat(router, model, messages=[{"role": "user", "content": f"hi {model}"}])


@pytest.fixture
def one(cluster: Cluster) -> Proc:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    # Scaled to zero: the first adapter request is held while the base starts.
    r = register(router, "lbase", engine="sim", min_replicas=0, extra_args=LORA_ARGS)
    assert r.status_code == 201, r.text
    for a in ADAPTERS:
        r = add_adapter(router, a, "lbase")
        assert r.status_code == 201, r.text
    return router


def test_adapters_load_on_demand_and_evict_least_recently_used(one: Proc) -> None:
    router = one
    rng = random.Random(7)
    sequence = [rng.choice(ADAPTERS[:4]) for _ in range(30)]
    for name in sequence:
        r = ask(router, name)
        assert r.status_code == 200, r.text
        assert r.json()["model"] == name  # the adapter answered, not the base
    (stats,) = engine_stats(router, "lbase").values()
    # The adapter header is the router's own: a client's is not passed on.
    r = httpx.post(f"{router.url}/v1/chat/completions", headers={"x-svllm-adapter": "ad0"},
                   json={"model": "lbase", "max_tokens": 2,
                         "messages": [{"role": "user", "content": "hi"}]}, timeout=30)
    assert r.status_code == 200 and r.json()["model"] == "lbase"
    events, holds = lru_events(sequence, 2)
    assert stats["lora"]["events"] == events
    assert set(stats["lora"]["loaded"]) == holds
    listed = {m["id"]: m for m in httpx.get(f"{router.url}/v1/models", timeout=5).json()["data"]}
    assert set(listed) == {"lbase", *ADAPTERS}
    assert listed["ad3"]["parent"] == "lbase" and listed["ad3"]["model_name"] == "org/ad3-lora"
    assert "parent" not in listed["lbase"]
    view = {a["alias"]: a for a in httpx.get(f"{router.url}/admin/adapters",
                                             timeout=5).json()["adapters"]}
    loads = sum(1 for e in stats["lora"]["events"] if e[0] == "load")
    assert sum(v["stats"]["loads"] for v in view.values()) == loads
    assert sum(v["stats"]["evictions"] for v in view.values()) == loads - 2
    # Counted apart from the base's cold starts: one start, however many adapter loads.
    base = model_status(router, "lbase")
    assert base is not None and base["stats"]["cold_starts"] == 1


def test_sixteen_clients_six_adapters_two_slots(one: Proc) -> None:
    router = one
    assert ask(router, "ad0").status_code == 200  # the base is up
    base_codes: list[int] = []
    stop = threading.Event()

    def base_client() -> None:
        while not stop.is_set():
            r = ask(router, "lbase")
            base_codes.append(r.status_code if r.json().get("model") == "lbase" else -1)

    work = [ADAPTERS[i % 6] for i in range(192)]
    random.Random(11).shuffle(work)

    def client(names: list[str]) -> list[tuple[str, int, str]]:
        out = []
        for name in names:
            r = ask(router, name)
            out.append((name, r.status_code, r.json().get("model", r.text)))
        return out

    watcher = threading.Thread(target=base_client)
    watcher.start()
    try:
        with ThreadPoolExecutor(16) as pool:
            results = [x for part in pool.map(client, [work[i::16] for i in range(16)])
                       for x in part]
    finally:
        stop.set()
        watcher.join()
    assert len(results) == 192
    assert [r for r in results if r[1] != 200 or r[2] != r[0]] == []
    assert base_codes and set(base_codes) == {200}
    (stats,) = engine_stats(router, "lbase").values()
    # Replaying the engine's log: never more than two at once, each unload of a loaded one.
    held: set[str] = set()
    for kind, name in stats["lora"]["events"]:
        if kind == "load":
            assert name not in held
            held.add(name)
        else:
            held.remove(name)
        assert len(held) <= 2
    assert held == set(stats["lora"]["loaded"])


def test_replica_holding_the_adapter_is_preferred(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    assert register(router, "pb", engine="sim", replicas=2,
                    extra_args=LORA_ARGS).status_code == 201
    assert add_adapter(router, "pa", "pb").status_code == 201
    wait_until(lambda: len(engine_stats(router, "pb")) == 2, 20, what="two replicas")
    assert ask(router, "pa").status_code == 200

    def holders() -> list[str]:
        view = httpx.get(f"{router.url}/admin/adapters", timeout=5).json()["adapters"]
        return list(view[0]["loaded_on"])

    wait_until(lambda: len(holders()) == 1, 10, what="holder published")
    (holder,) = holders()
    for _ in range(12):
        assert ask(router, "pa").status_code == 200
    loads = {w: s["lora"]["loads"] for w, s in engine_stats(router, "pb").items()}
    assert loads == {w: int(w == holder) for w in ("w1", "w2")}


def test_bad_adapter_registrations_are_refused(cluster: Cluster) -> None:
    cluster.manager()
    router = cluster.router()
    assert register(router, "plain", engine="sim").status_code == 201
    assert register(router, "lb", engine="sim", extra_args=LORA_ARGS).status_code == 201
    assert add_adapter(router, "good", "lb").status_code == 201

    def refused(expect: int, **body: Any) -> None:
        r = httpx.post(f"{router.url}/admin/adapters", json=body, timeout=10)
        assert r.status_code == expect, (body, r.text)
        assert "error" in r.json() and r.json()["error"]["message"]

    refused(404, alias="x1", base="nobase", adapter="org/x")
    refused(400, alias="x2", base="plain", adapter="org/x")  # no --enable-lora
    for alias in ("../etc", "a b", "-rf", "a:b", "", "x" * 200):
        refused(400, alias=alias, base="lb", adapter="org/x")
    for adapter in ("../../etc/passwd", "-x", "org/a b", "/etc/lora", "a\nb", ""):
        refused(400, alias="x3", base="lb", adapter=adapter)
    refused(400, alias="x4", base="lb", adapter="org/x", extra="field")
    refused(400, alias="x5", base="../lb", adapter="org/x")
    refused(409, alias="plain", base="lb", adapter="org/x")  # a model's alias
    refused(409, alias="good", base="lb", adapter="org/other")  # registered differently
    assert register(router, "good", engine="sim").status_code == 409  # an adapter's alias
    # The same registration again is no change.
    assert add_adapter(router, "good", "lb").status_code == 200
    listed = httpx.get(f"{router.url}/admin/adapters", timeout=5).json()["adapters"]
    assert [a["alias"] for a in listed] == ["good"]
    assert httpx.delete(f"{router.url}/admin/adapters/nope", timeout=5).status_code == 404
    assert httpx.delete(f"{router.url}/admin/adapters/..%2Fx", timeout=5).status_code == 404
    # An adapter whose base was deleted: 404 naming the base, nothing started.
    assert httpx.delete(f"{router.url}/admin/models/lb", timeout=5).status_code == 200
    r = ask(router, "good")
    assert r.status_code == 404 and "lb" in r.json()["error"]["message"]
    assert httpx.delete(f"{router.url}/admin/adapters/good", timeout=5).status_code == 200
    assert ask(router, "good").status_code == 404
