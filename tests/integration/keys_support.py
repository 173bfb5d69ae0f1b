"""Helpers of the API-key tests: a pool with several routers, keys made through the API."""

from __future__ import annotations

from functools import partial
from typing import Any

import httpx

from tests.support import Cluster, Proc, register, wait_until

ADMIN = "admin-secret"
ADMIN_H = {"authorization": f"Bearer {ADMIN}"}


def pool(cluster: Cluster, routers: int = 2, **env: str) -> list[Proc]:
    """A manager, a worker and ``routers`` routers; model m1 serving."""
    cluster.extra_env.update({"ADMIN_TOKEN": ADMIN, "KEYS_CHECK_S": "0.5"} | env)
    cluster.manager()
    cluster.worker("w1")
    out = [cluster.router(f"router{i}") for i in range(routers)]
    assert register(out[0], "m1", token=ADMIN, engine="sim").status_code == 201
    return out


def serving(routers: list[Proc], alias: str, key: str | None = None) -> None:
    for r in routers:
        wait_until(partial(answers, r, alias, key, 200), 60, interval=0.2,
                   what=f"{alias} serving on {r.name}")


def answers(router: Proc, alias: str, key: str | None, code: int) -> bool:
    return chat(router, alias, key).status_code == code


def create_key(router: Proc, **fields: Any) -> dict[str, Any]:
    body = {"name": "k", "tenant": "acme"} | fields
    r = httpx.post(f"{router.url}/admin/keys", json=body, headers=ADMIN_H, timeout=10)
    assert r.status_code == 201, r.text
    return dict(r.json())


def known(routers: list[Proc], *keys: str) -> None:
    """Wait until every router's key ring has ``keys`` (GET /v1/models: no limit spent).
    A router whose ring is still empty serves open (AUTH_MODE=auto) and would answer 200
    to any key, so it must also refuse a request without one."""
    def everywhere() -> bool:
        return all(httpx.get(f"{r.url}/v1/models", timeout=10).status_code == 401
                   for r in routers) and all(
            httpx.get(f"{r.url}/v1/models", headers={"authorization": f"Bearer {k}"},
                      timeout=10).status_code == 200 for r in routers for k in keys)

    wait_until(everywhere, 5, interval=0.05, what="the keys on every router")


def chat(router: Proc, alias: str, key: str | None, **extra: Any) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 5} | extra
    headers = {"authorization": f"Bearer {key}"} if key else {}
    return httpx.post(f"{router.url}/v1/chat/completions", json=body, headers=headers,
                      timeout=30)


def admin(router: Proc, method: str, path: str, **kw: Any) -> httpx.Response:
    return httpx.request(method, f"{router.url}/admin{path}", headers=ADMIN_H, timeout=10,
                         **kw)
