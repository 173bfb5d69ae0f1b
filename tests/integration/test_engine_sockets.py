"""Where engines serve (ENGINE_SOCKETS): by default on a Unix socket in a directory of the
worker's own that no other user may enter, with no TCP port at all; with ``tcp`` on a loopback
port as before. Real worker, router and manager processes, real simulated engines."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

from tests.support import (
    Cluster,
    Proc,
    chat,
    engine_address,
    model_status,
    register,
    sim_stats,
    wait_serving,
    wait_until,
)


def _instance(router: Proc, alias: str) -> dict[str, str]:
    m = model_status(router, alias)
    assert m is not None
    return dict(m["instances"][0])


def _tcp_listeners(pid: int) -> set[int]:
    """The TCP ports process ``pid`` listens on (its sockets among /proc/net/tcp's LISTEN
    rows)."""
    inodes = set()
    for fd in Path(f"/proc/{pid}/fd").iterdir():
        try:
            target = os.readlink(fd)
        except OSError:
            continue
        if target.startswith("socket:["):
            inodes.add(target[8:-1])
    ports = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            cols = line.split()
            if cols[3] == "0A" and cols[9] in inodes:  # 0A: LISTEN
                ports.add(int(cols[1].rsplit(":", 1)[1], 16))
    return ports


def test_an_engine_serves_on_a_socket_only_the_worker_reaches(cluster: Cluster) -> None:
    cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "m", engine="sim").status_code == 201
    wait_serving(router, "m")
    inst = _instance(router, "m")
    path = Path(inst["socket"])
    assert inst["port"] == "0" and path.is_socket()
    # Its directory: the worker's own, entered by nobody else (0700).
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.parent.stat().st_uid == os.getuid()
    # No TCP port at all: nothing on the network or loopback reaches the engine.
    assert _tcp_listeners(int(inst["pid"])) == set()
    # Requests reach it through the worker (stream and not), and its log says where it is.
    before = sim_stats(engine_address(inst))["requests"]
    assert chat(router, "m").status_code == 200
    assert chat(router, "m", stream=True).status_code == 200
    assert sim_stats(engine_address(inst))["requests"] == before + 2
    log = (cluster.tmp / "state" / "w1" / "m.log").read_text()
    assert f"Uvicorn running on unix socket {path}" in log
    # The worker's stop takes the engine and its socket's directory with it.
    worker.stop()
    assert not path.parent.exists()


def test_engine_sockets_tcp_keeps_a_loopback_port(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1", ENGINE_SOCKETS="tcp")
    router = cluster.router()
    assert register(router, "m", engine="sim").status_code == 201
    wait_serving(router, "m")
    inst = _instance(router, "m")
    assert inst["socket"] == "" and int(inst["port"]) > 0
    wait_until(lambda: _tcp_listeners(int(inst["pid"])) == {int(inst["port"])}, 10,
               what="the engine listening on its port")
    assert chat(router, "m", stream=True).status_code == 200


def test_a_bad_engine_sockets_setting_stops_the_worker_with_a_message(
        cluster: Cluster) -> None:
    with pytest.raises(AssertionError, match="exited with"):
        cluster.worker("w1", ENGINE_SOCKETS="pipes")
    assert "engine_sockets" in (cluster.tmp / "w1.log").read_text().lower()


def test_an_engine_whose_socket_file_was_removed_is_restarted_on_a_fresh_one(
        cluster: Cluster) -> None:
    # A temporary-file cleaner that deletes a live engine's socket: the engine still serves
    # the pooled connections (the worker's health check's among them) but refuses every new
    # one. The worker notices the file is gone and restarts the engine on a new socket.
    cluster.manager()
    cluster.worker("w1", ENGINE_HEALTH_INTERVAL_S="0.3", ENGINE_HEALTH_FAILURES="2")
    router = cluster.router()
    assert register(router, "m", engine="sim").status_code == 201
    wait_serving(router, "m")
    first = _instance(router, "m")
    assert chat(router, "m", stream=True).status_code == 200
    Path(first["socket"]).unlink()

    def restarted() -> dict[str, str] | None:
        inst = _instance(router, "m")
        moved = inst["state"] == "RUNNING" and inst["socket"] not in ("", first["socket"])
        return inst if moved else None

    now = wait_until(restarted, 30, interval=0.2, what="the engine on a new socket")
    assert now["pid"] != first["pid"] and Path(now["socket"]).is_socket()
    wait_serving(router, "m")
    log = (cluster.tmp / "w1.log").read_text()
    assert f"its socket file {first['socket']} was removed or replaced" in log
