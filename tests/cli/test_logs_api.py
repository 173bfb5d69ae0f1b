"""The engine-log endpoints the CLI and the console read: tokens, and no file outside
STATE_DIR's engine logs readable."""

from __future__ import annotations

import os

import httpx
import pytest

from tests.support import Cluster, Proc, register, wait_serving

ADMIN, INTERNAL = "adm-tok", "int-tok"


@pytest.fixture
def pool(cluster: Cluster) -> tuple[Cluster, Proc, Proc]:
    cluster.extra_env.update(ADMIN_TOKEN=ADMIN, INTERNAL_TOKEN=INTERNAL)
    cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "m", token=ADMIN, engine="sim").status_code == 201
    wait_serving(router, "m")
    return cluster, router, worker


def get(url: str, token: str | None, **params: str | int) -> httpx.Response:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.get(url, headers=headers, params=params, timeout=10)


def test_log_through_router_and_worker(pool: tuple[Cluster, Proc, Proc]) -> None:
    _, router, worker = pool
    r = get(f"{router.url}/admin/models/m/log", ADMIN, lines=2)
    assert r.status_code == 200, r.text
    body = r.json()
    assert body["worker_id"] == "w1" and body["text"].count("\n") == 2
    assert body["offset"] == body["size"] > 0
    # From an offset: only what came after it (nothing yet), and the same offset back.
    again = get(f"{router.url}/admin/models/m/log", ADMIN, since=body["offset"]).json()
    assert again["text"] == "" and again["offset"] == body["offset"]
    whole = get(f"{router.url}/admin/models/m/log", ADMIN, since=0).json()
    assert "model loaded" in whole["text"] and whole["offset"] == body["size"]

    assert get(f"{router.url}/admin/models/m/log", None).status_code == 401
    assert get(f"{router.url}/admin/models/m/log", INTERNAL).status_code == 401
    assert get(f"{worker.url}/instances/m/log", None).status_code == 401
    assert get(f"{worker.url}/instances/m/log", ADMIN).status_code == 401
    assert get(f"{worker.url}/instances/m/log", INTERNAL).status_code == 200


def test_no_file_outside_the_engine_logs(pool: tuple[Cluster, Proc, Proc]) -> None:
    cluster, router, worker = pool
    # A symlink planted where an engine log would be must not lead out of STATE_DIR.
    os.symlink("/etc/passwd", cluster.tmp / "state" / "w1" / "evil.log")
    r = get(f"{worker.url}/instances/evil/log", INTERNAL)
    assert r.status_code == 404 and "root:" not in r.text
    # httpx removes a literal '..' segment, so encoded ones are what reaches the worker.
    for alias, status in (("-x", {400}), ("%2e%2e", {400, 404}),
                          ("..%2F..%2Fetc%2Fpasswd", {404}), ("nope", {404})):
        r = get(f"{worker.url}/instances/{alias}/log", INTERNAL)
        assert r.status_code in status, (alias, r.text)
        assert "root:" not in r.text and r.json()["error"]["message"]
    r = get(f"{router.url}/admin/models/m/log", ADMIN, worker="../w1")
    assert r.status_code == 400 and "invalid worker id" in r.json()["error"]["message"]
    r = get(f"{router.url}/admin/models/m/log", ADMIN, worker="w9")
    assert r.status_code == 404 and "unknown worker 'w9'" in r.json()["error"]["message"]
    r = get(f"{router.url}/admin/models/m/log", ADMIN, lines=0)
    assert r.status_code == 400


def test_console_page_is_public_and_its_api_is_not(pool: tuple[Cluster, Proc, Proc]) -> None:
    _, router, _ = pool
    r = httpx.get(f"{router.url}/console", timeout=10)
    assert r.status_code == 307 and r.headers["location"] == "/console/"
    page = httpx.get(f"{router.url}/console/", timeout=10)
    assert page.status_code == 200 and "Admin token" in page.text
    assert httpx.get(f"{router.url}/console/console.js", timeout=10).status_code == 200
    # Only the static directory: the router's own sources are not reachable through it.
    for path in ("/console/%2e%2e/console_api.py", "/console/../console_api.py",
                 "/console/..%2Fconsole_api.py"):
        r = httpx.get(f"{router.url}{path}", timeout=10)
        assert r.status_code == 404 and "STATIC_DIR" not in r.text, path
    r = httpx.post(f"{router.url}/admin/models/apply", json={"models": []}, timeout=10)
    assert r.status_code == 401
    assert r.json()["error"]["code"] == "invalid_api_key"
