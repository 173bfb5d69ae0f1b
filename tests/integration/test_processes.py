"""ROUTER_PROCESSES=2: one port served by two router processes under a supervisor (real
redis-server, manager, worker, sim engines, real HTTP). Each process serves; a killed one is
started again while the port keeps answering; SIGTERM or SIGKILL of the supervisor leaves
nothing running; every process counts as a router where max_inflight is split; /metrics sums
the processes."""

from __future__ import annotations

import concurrent.futures
import os
import signal
import threading
import time
from pathlib import Path

import httpx
import pytest
import redis
from prometheus_client.parser import text_string_to_metric_families

from shared.keys import Keys
from tests.integration.test_fair_queue import peak_running
from tests.support import (
    Cluster,
    Proc,
    chat,
    child_pids,
    engines,
    register,
    running_on,
    wait_serving,
    wait_until,
)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie is not serving: only a live process counts.
    with open(f"/proc/{pid}/stat") as f:
        return f.read().rsplit(")", 1)[1].split()[0] != "Z"


def _process_of(router: Proc) -> int:
    """Which process answered a /health on a new connection (httpx.get: one per call)."""
    return int(httpx.get(f"{router.url}/health", timeout=10).json()["process"])


def _both_serve(router: Proc) -> None:
    seen: set[int] = set()

    def both() -> bool:
        seen.add(_process_of(router))
        return seen == {0, 1}

    wait_until(both, 30, interval=0.01, what="both router processes answering")


def _children(router: Proc) -> list[int]:
    assert router.popen is not None
    return sorted(child_pids(router.popen.pid))


def test_two_processes_share_the_port_and_a_killed_one_is_restarted(cluster: Cluster) -> None:
    router = cluster.router(ROUTER_PROCESSES="2")
    assert httpx.get(f"{router.url}/health", timeout=5).json()["process"] in (0, 1)
    wait_until(lambda: len(_children(router)) == 2, 30, what="two router processes")
    _both_serve(router)
    first = _children(router)
    victim = first[0]
    os.kill(victim, signal.SIGKILL)
    # The port answers throughout: the survivor serves, and connections hashed to the dead
    # one's socket wait in its backlog (held open by the supervisor) until the new one runs.
    deadline = time.monotonic() + 5
    while time.monotonic() < deadline:
        assert httpx.get(f"{router.url}/health", timeout=30).status_code == 200
    wait_until(lambda: len(_children(router)) == 2 and victim not in _children(router), 30,
               what="the killed process replaced")
    _both_serve(router)
    assert router.popen is not None and router.popen.poll() is None


def test_sigterm_of_the_supervisor_drains_every_process(cluster: Cluster) -> None:
    router = cluster.router(ROUTER_PROCESSES="2")
    wait_until(lambda: len(_children(router)) == 2, 30, what="two router processes")
    kids = _children(router)
    assert router.popen is not None
    router.popen.send_signal(signal.SIGTERM)
    assert router.popen.wait(timeout=30) == 0
    assert not [p for p in kids if _alive(p)]
    with pytest.raises(httpx.ConnectError):
        httpx.get(f"{router.url}/health", timeout=5)


def test_a_supervisor_killed_with_sigkill_takes_its_processes_along(cluster: Cluster) -> None:
    router = cluster.router(ROUTER_PROCESSES="2")
    wait_until(lambda: len(_children(router)) == 2, 30, what="two router processes")
    kids = _children(router)
    assert router.popen is not None
    sibling_dir = _sibling_dir(kids[0])
    router.popen.kill()  # the supervisor alone, not the children's groups
    router.popen.wait(timeout=5)
    wait_until(lambda: not [p for p in kids if _alive(p)], 10,
               what="the orphaned router processes gone")
    # What the killed supervisor could not clean up, the next one does.
    assert sibling_dir.exists()
    cluster.router(ROUTER_PROCESSES="2")
    assert not sibling_dir.exists()


def _sibling_dir(pid: int) -> Path:
    env = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
    raw = next(e for e in env if e.startswith(b"SVLLM_ROUTER_CHILD=")).decode()
    return Path(raw.split(":", 4)[4])


def _checked_in(cluster: Cluster) -> int:
    client = redis.Redis.from_url(cluster.redis_url)
    try:
        return int(client.zcard(Keys(cluster.prefix).routers))
    finally:
        client.close()


def _peak(router: Proc, alias: str, n: int) -> int:
    port = engines(router, alias)["w1"]
    stop = threading.Event()
    seen = peak_running(port, stop)
    with concurrent.futures.ThreadPoolExecutor(n) as pool:  # one connection per request
        answers = list(pool.map(lambda _: chat(router, alias), range(n)))
    stop.set()
    assert [a.status_code for a in answers] == [200] * n
    return max(seen)


def _capped(cluster: Cluster, cap: int, **router_env: str) -> Proc:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router(ROUTER_PROCESSES="2", **router_env)
    assert register(router, "capped", engine="sim", max_inflight=cap,
                    extra_args=["--ttft", "0.3"]).status_code == 201
    wait_until(lambda: running_on(router, "capped") == ["w1"], 30, what="capped running")
    wait_serving(router, "capped")
    _both_serve(router)
    return router


def test_every_process_counts_as_a_router_checking_in(cluster: Cluster) -> None:
    # ROUTER_COUNT=0: each process checks in under its own id, so each takes 2 // 2 slots.
    router = _capped(cluster, 2)
    wait_until(lambda: _checked_in(cluster) == 2, 10, what="both processes checked in")
    time.sleep(1.0)  # every process has read the count (KEYS_CHECK_S)
    # 12 one-connection requests: both processes get some (all on one: 1 in 2048).
    assert _peak(router, "capped", 12) == 2


def test_router_count_is_multiplied_by_the_processes(cluster: Cluster) -> None:
    # ROUTER_COUNT=1 (this router alone) with 2 processes: each takes 4 // 2 slots.
    router = _capped(cluster, 4, ROUTER_COUNT="1")
    assert _peak(router, "capped", 16) <= 4


def test_metrics_sum_every_process(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router(ROUTER_PROCESSES="2")
    assert register(router, "m", engine="sim").status_code == 201
    wait_serving(router, "m")
    _both_serve(router)

    def total() -> float:
        text = httpx.get(f"{router.url}/metrics", timeout=10).text
        assert "svllm_router_processes_scraped 2.0" in text
        return sum(s.value for fam in text_string_to_metric_families(text)
                   if fam.name == "svllm_router_requests" for s in fam.samples
                   if s.labels["model"] == "m" and s.labels["status"] == "2xx")

    before = total()
    for _ in range(20):  # a new connection each: both processes serve some
        assert chat(router, "m").status_code == 200
    # Whichever process takes the scrape, it reports all 20.
    for _ in range(6):
        assert total() == before + 20
