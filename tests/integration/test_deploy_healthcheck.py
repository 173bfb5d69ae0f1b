"""The containers' health check (services/healthcheck.py, the image's HEALTHCHECK and
compose's) against real services: 0 while a service answers /health, 1 once it is gone."""

from __future__ import annotations

import subprocess
import sys

from tests.support import ROOT, Cluster, free_port


def run_check(service: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "services.healthcheck", service], env=env,
                          cwd=ROOT, capture_output=True, text=True, timeout=30, check=False)


def test_healthcheck_follows_a_real_manager_and_router(cluster: Cluster) -> None:
    manager = cluster.manager()
    router = cluster.router()
    for service, proc in (("manager", manager), ("router", router)):
        port = proc.url.rsplit(":", 1)[1]
        env = cluster.env(**{f"{service.upper()}_PORT": port,
                             f"{service.upper()}_HOST": "127.0.0.1"})
        ok = run_check(service, env)
        assert ok.returncode == 0, ok.stderr
        proc.stop()
        down = run_check(service, env)
        assert down.returncode == 1
        assert "unhealthy" in down.stderr and port in down.stderr


def test_healthcheck_fails_where_nothing_listens(cluster: Cluster) -> None:
    env = cluster.env(WORKER_PORT=str(free_port()))
    out = run_check("worker", env)
    assert out.returncode == 1, out.stderr
