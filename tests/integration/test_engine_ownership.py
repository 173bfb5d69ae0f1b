"""Engine process trees are owned as a whole, by the pool and the launching worker process.

Real redis-servers, real services, real sim engines whose child process (``--spawn-child``)
ignores its parent, renames itself and clears its environment, as vLLM's EngineCore does.
"""

from __future__ import annotations

import json
import os
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
import redis

from shared import procs
from tests.support import (
    Cluster,
    Proc,
    RedisServer,
    chat,
    free_port,
    model_status,
    register,
    running_on,
    wait_serving,
    wait_until,
)

CORE_NAME = "SIM::EngineCore"


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return None


def group_members(pgid: int) -> set[int]:
    """Live (not zombie) processes of the process group ``pgid``."""
    out = set()
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            st = _stat(int(entry.name))
            if st is not None and st[0] != "Z" and int(st[2]) == pgid:
                out.add(int(entry.name))
    return out


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def processes_named(name: str) -> set[int]:
    return {int(e.name) for e in Path("/proc").iterdir()
            if e.name.isdigit() and comm(int(e.name)) == name}


def alive(pid: int, start: int) -> bool:
    st = _stat(pid)
    return st is not None and st[0] != "Z" and procs.proc_start(pid) == start


def instance(router: Proc, alias: str) -> dict[str, Any]:
    m = model_status(router, alias)
    assert m and m["instances"], m
    return dict(m["instances"][0])


class Tree:
    """The engine's processes, each as (pid, start time), and its keeper."""

    def __init__(self, inst: dict[str, Any]) -> None:
        self.pgid = int(inst["pgid"])
        assert self.pgid == int(inst["pid"])
        self.keeper = int(inst["keeper_pid"])
        self.members = {p: procs.proc_start(p) for p in group_members(self.pgid)}
        self.core = next(p for p in self.members if comm(p) == CORE_NAME)

    def left(self) -> list[int]:
        by_record = [p for p, s in self.members.items() if s is not None and alive(p, s)]
        return by_record + sorted(group_members(self.pgid))

    def gone(self) -> bool:
        return not self.left() and procs.proc_start(self.keeper) is None

    def kill(self) -> None:
        procs.signal_group(self.pgid, signal.SIGKILL)
        procs.signal_pid(self.keeper, signal.SIGKILL)


@pytest.fixture
def trees() -> Iterator[list[Tree]]:
    """Trees a test made; whatever happened, nothing of them is left running."""
    made: list[Tree] = []
    yield made
    for t in made:
        t.kill()


def test_kill9_worker_leaves_no_engine_process(cluster: Cluster, trees: list[Tree]) -> None:
    cluster.manager()
    worker = cluster.worker("crashy")
    router = cluster.router()
    assert register(router, "deep", engine="sim", extra_args=["--spawn-child"]).status_code == 201
    wait_until(lambda: running_on(router, "deep") == ["crashy"], 20, what="deep running")
    tree = Tree(instance(router, "deep"))
    trees.append(tree)
    assert len(tree.members) == 2  # the engine and its engine-core child
    # The child is what defeated environment markers: renamed, empty environment.
    assert Path(f"/proc/{tree.core}/environ").read_bytes() == b""
    assert tree.core in processes_named(CORE_NAME)

    worker.kill9()
    t0 = time.monotonic()
    wait_until(tree.gone, 10, interval=0.1, what=f"engine tree gone: {tree.left()}")
    assert tree.core not in processes_named(CORE_NAME)
    print(f"engine tree gone {time.monotonic() - t0:.2f}s after kill -9 of its worker")


def test_engine_record_in_state_dir_and_redis(cluster: Cluster, trees: list[Tree]) -> None:
    cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "rec", engine="sim", extra_args=["--spawn-child"]).status_code == 201
    wait_until(lambda: running_on(router, "rec") == ["w1"], 20, what="rec running")
    inst = instance(router, "rec")
    trees.append(Tree(inst))
    records = list((cluster.tmp / "state" / "w1" / "engines").glob("*.rec.json"))
    assert len(records) == 1
    rec = json.loads(records[0].read_text())
    assert rec["pgid"] == int(inst["pgid"]) and rec["keeper_pid"] == int(inst["keeper_pid"])
    assert rec["launcher_pid"] == worker.popen.pid  # type: ignore[union-attr]
    assert inst["launcher"] == f"{rec['pool']}/{rec['launcher_pid']}@{rec['launcher_start']}"
    assert records[0].name == f"{rec['pool']}.rec.json"
    assert httpx.delete(f"{router.url}/admin/models/rec").status_code == 200
    wait_until(lambda: not records[0].exists(), 15, what="record removed after the stop")


def _freeze_and_kill(worker: Proc, keeper: int) -> None:
    """A crash that takes the keeper too: the engine leader dies with it (PDEATHSIG), its
    child does not. The keeper is stopped first so it cannot end the tree on its way out."""
    os.kill(keeper, signal.SIGSTOP)
    worker.kill9()
    os.kill(keeper, signal.SIGKILL)


def test_two_pools_same_worker_id_leave_each_other_alone(
    redis_server: RedisServer, tmp_path: Path, trees: list[Tree]
) -> None:
    """Two pools (two redis-servers) on one machine with the same WORKER_ID, prefix and state
    dir: a worker's restart sweep ends only its own pool's orphans."""
    other_redis = RedisServer(free_port(), tmp_path / "redis-b").start()
    shared = {"STATE_DIR": str(tmp_path / "shared-state")}
    a = Cluster(redis_server.url, "same", tmp_path / "a", extra_env=shared)
    b = Cluster(other_redis.url, "same", tmp_path / "b", extra_env=shared)
    flush = redis.Redis.from_url(redis_server.url)
    flush.delete(*flush.keys("same:*") or ["same:none"])
    flush.close()
    try:
        _two_pools(a, b, trees)
    except BaseException:
        print(a.logs(), b.logs())
        raise
    finally:
        a.stop_all()
        b.stop_all()
        other_redis.stop()


def _two_pools(a: Cluster, b: Cluster, trees: list[Tree]) -> None:
    a.manager()
    a_worker = a.worker("vm")
    a_router = a.router()
    assert register(a_router, "demo", extra_args=["--spawn-child"]).status_code == 201
    wait_until(lambda: running_on(a_router, "demo") == ["vm"], 20, what="pool A serving")
    a_tree = Tree(instance(a_router, "demo"))
    trees.append(a_tree)

    # Pool B starts on the same machine: its sweep must leave A's live engine alone.
    b.manager()
    b_worker = b.worker("vm")
    b_router = b.router()
    assert register(b_router, "demo", extra_args=["--spawn-child"]).status_code == 201
    wait_until(lambda: running_on(b_router, "demo") == ["vm"], 20, what="pool B serving")
    trees.append(Tree(instance(b_router, "demo")))
    assert set(a_tree.left()) >= set(a_tree.members)
    wait_serving(a_router, "demo")

    # A real orphan in pool A: its worker and its keeper killed; the engine core lives on.
    _freeze_and_kill(a_worker, a_tree.keeper)
    wait_until(lambda: set(a_tree.left()) == {a_tree.core}, 10,
               what=f"only A's engine core left: {a_tree.left()}")

    # Pool B's worker crashes and restarts: its sweep ends B's leftovers, not A's orphan.
    b_worker.kill9()
    b.procs.remove(b_worker)
    b_worker = b.worker("vm")
    wait_until(lambda: chat(b_router, "demo").status_code == 200, 30, what="pool B back")
    trees.append(Tree(instance(b_router, "demo")))
    assert a_tree.core in a_tree.left(), "pool B's sweep killed pool A's engine"
    # B's sweep may end B's own leftovers (its keeper's grace can outlast the restart on a
    # loaded machine), never A's.
    assert f"process group {a_tree.pgid}," not in b_worker.tail(400)

    # Pool A's worker restarts: its sweep ends the orphan, by the recorded group.
    a.procs.remove(a_worker)
    a_worker = a.worker("vm")
    wait_until(lambda: not a_tree.left(), 15, what=f"A's orphan swept: {a_tree.left()}")
    assert "ended orphaned engine of demo" in a_worker.tail(400)
    wait_until(lambda: chat(a_router, "demo").status_code == 200, 30, what="pool A back")
    trees.append(Tree(instance(a_router, "demo")))


def test_engine_environment_is_allowlisted(cluster: Cluster, trees: list[Tree]) -> None:
    tokens = {"ADMIN_TOKEN": "adm-secret-1", "INTERNAL_TOKEN": "int-secret-2"}
    cluster.extra_env.update(tokens)
    cluster.manager()
    cluster.worker("w1", ENGINE_ENV_PASSTHROUGH="MY_ENGINE_VAR,MYPREFIX_*", MY_ENGINE_VAR="yes",
                   MYPREFIX_A="a", NOT_PASSED="no", HF_HOME="/tmp/hf-home",
                   REDIS_PASSWORD="redis-secret-3")
    router = cluster.router()
    token = tokens["ADMIN_TOKEN"]
    assert register(router, "env", token, extra_args=["--spawn-child"]).status_code == 201
    inst = wait_until(lambda: _running(router, "env", token), 20, what="env running")
    tree = Tree(inst)
    trees.append(tree)
    for pid in (tree.pgid, tree.keeper):
        raw = Path(f"/proc/{pid}/environ").read_bytes().split(b"\0")
        env = dict(item.decode().split("=", 1) for item in raw if b"=" in item)
        for secret in ("adm-secret-1", "int-secret-2", "redis-secret-3", cluster.redis_url):
            assert not any(secret in v for v in env.values()), (pid, env)
        assert not {"ADMIN_TOKEN", "INTERNAL_TOKEN", "REDIS_URL", "REDIS_PREFIX"} & set(env)
        assert env["MY_ENGINE_VAR"] == "yes" and env["MYPREFIX_A"] == "a"
        assert env["HF_HOME"] == "/tmp/hf-home" and "PATH" in env
        assert "NOT_PASSED" not in env


def _running(router: Proc, alias: str, token: str) -> dict[str, Any] | None:
    m = model_status(router, alias, token)
    inst = m["instances"][0] if m and m["instances"] else None
    return dict(inst) if inst and inst["state"] == "RUNNING" else None
