"""One pool per module for the security tests: real redis-server and service processes, with
every token set (as the issue's attacker found them) and short edge timeouts."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from tests.support import Cluster, Proc, RedisServer

ADMIN = "admin-secret"
INTERNAL = "internal-secret"
API = "api-secret"
TOKENS = {"ADMIN_TOKEN": ADMIN, "INTERNAL_TOKEN": INTERNAL, "API_TOKEN": API}
# Short enough for tests to see them fire, long enough for a loaded machine's honest client.
EDGE_ENV = {"HEADER_TIMEOUT_S": "1", "BODY_TIMEOUT_S": "1", "KEEP_ALIVE_S": "1",
            "MAX_BODY_BYTES": "65536"}


def bearer(token: str) -> dict[str, str]:
    return {"authorization": f"Bearer {token}"}


@dataclass
class SecurePool:
    cluster: Cluster
    manager: Proc
    worker: Proc
    router: Proc
    router_asgi: Proc  # FAST_LANE=false: the same limits on the ASGI-only path

    def by_name(self, name: str) -> Proc:
        proc = getattr(self, name)
        assert isinstance(proc, Proc)
        return proc


def port_of(proc: Proc) -> int:
    return int(proc.url.rsplit(":", 1)[1])


@pytest.fixture(scope="module")
def pool(redis_server: RedisServer, tmp_path_factory: pytest.TempPathFactory,
         request: pytest.FixtureRequest) -> Iterator[SecurePool]:
    tmp: Path = tmp_path_factory.mktemp("security")
    c = Cluster(redis_server.url, f"s{uuid.uuid4().hex[:10]}", tmp)
    c.extra_env.update(TOKENS | EDGE_ENV)
    try:
        manager = c.manager()
        worker = c.worker("w1", MANAGER_URL=manager.url)
        router = c.router()
        router_asgi = c.router("router-asgi", FAST_LANE="false")
        yield SecurePool(c, manager, worker, router, router_asgi)
    finally:
        c.stop_all()
        if request.session.testsfailed:
            print(c.logs())
