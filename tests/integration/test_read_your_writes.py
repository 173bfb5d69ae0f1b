"""What one router writes, another serves at once: a model, an adapter or an API key created
through router A is found by router B on the very next request (services/router/misses.py).

A router's copies refresh on events and timers; a request that misses its copy waits for a
re-read begun after it arrived. The old rate-limited re-read answered 404 for a model whose
registration had returned 201 at another router 17 ms before (a CI flake)."""

from __future__ import annotations

import httpx

from tests.integration.keys_support import ADMIN, ADMIN_H, create_key, known, pool
from tests.support import Cluster, Proc, register

ROUNDS = 15


def retrieve(router: Proc, alias: str, key: str = ADMIN) -> httpx.Response:
    return httpx.get(f"{router.url}/v1/models/{alias}", timeout=10,
                     headers={"authorization": f"Bearer {key}"})


def test_model_and_adapter_registered_elsewhere_are_found_at_once(cluster: Cluster) -> None:
    a, b = pool(cluster, 2)
    for i in range(ROUNDS):
        r = register(a, f"ryw{i}", token=ADMIN, engine="sim", min_replicas=0)
        assert r.status_code == 201, r.text
        got = retrieve(b, f"ryw{i}")
        assert got.status_code == 200, f"round {i}: {got.text}"
        assert got.json()["id"] == f"ryw{i}"
    assert register(a, "lb", token=ADMIN, engine="sim", min_replicas=0,
                    extra_args=["--enable-lora", "--max-loras", "2"]).status_code == 201
    for i in range(ROUNDS):
        r = httpx.post(f"{a.url}/admin/adapters", headers=ADMIN_H, timeout=10,
                       json={"alias": f"ad{i}", "base": "lb", "adapter": f"org/ad{i}"})
        assert r.status_code == 201, r.text
        got = retrieve(b, f"ad{i}")
        assert got.status_code == 200, f"round {i}: {got.text}"
        assert got.json()["parent"] == "lb"
    # What exists nowhere is still a 404.
    assert retrieve(b, "ghost").status_code == 404


def test_key_created_elsewhere_works_at_once(cluster: Cluster) -> None:
    a, b = pool(cluster, 2)
    first = create_key(a, models=["*"])["key"]
    known([a, b], first)  # keys mode everywhere: from here an unknown key is a 401
    for i in range(ROUNDS):
        secret = create_key(a, models=["*"], name=f"k{i}")["key"]
        got = retrieve(b, "m1", secret)
        assert got.status_code == 200, f"round {i}: {got.text}"
    wrong = retrieve(b, "m1", "sk-svllm-" + "x" * 40)
    assert wrong.status_code == 401 and wrong.json()["error"]["code"] == "invalid_api_key"
