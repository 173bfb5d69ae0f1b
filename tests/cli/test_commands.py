"""Every ``svllm`` command against a real pool (redis, manager, worker, router, sim engine)."""

from __future__ import annotations

import json
import queue
import threading
import time

import pytest

from tests.cli.support import spawn_svllm, svllm
from tests.support import Cluster, Proc, model_status, snapshot, wait_until

TOKEN = "cli-secret"


@pytest.fixture
def router(cluster: Cluster) -> Proc:
    cluster.extra_env.update(ADMIN_TOKEN=TOKEN)
    cluster.manager()
    cluster.worker("w1")
    return cluster.router()


def state(router: Proc, alias: str) -> str | None:
    m = model_status(router, alias, TOKEN)
    return m["state"] if m else None


def lines_of(proc) -> queue.Queue[str]:
    q: queue.Queue[str] = queue.Queue()

    def pump() -> None:
        for line in proc.stdout:
            q.put(line)

    threading.Thread(target=pump, daemon=True).start()
    return q


def wait_line(q: queue.Queue[str], needle: str, timeout: float = 20) -> str:
    deadline = time.monotonic() + timeout
    seen = []
    while time.monotonic() < deadline:
        try:
            line = q.get(timeout=0.2)
        except queue.Empty:
            continue
        seen.append(line)
        if needle in line:
            return line
    raise AssertionError(f"no line with {needle!r} in {seen}")


def test_register_status_show_logs_control_and_remove(router: Proc) -> None:
    r = svllm(router, "models", "register", "m1", "sim/m1", "--engine", "sim",
              "--set", "idle_sleep_s=600", "--wait", "--timeout", "60", token=TOKEN)
    assert r.code == 0, r.err
    assert "m1: registered" in r.out and "m1 serving on w1" in r.out

    r = svllm(router, "status", token=TOKEN)
    assert r.code == 0, r.err
    for word in ("Workers", "w1", "Models", "m1", "RUNNING", "1/1", "Instances", "Problems"):
        assert word in r.out
    data = json.loads(svllm(router, "status", "--json", token=TOKEN).out)
    assert [m["alias"] for m in data["models"]] == ["m1"]
    assert [w["worker_id"] for w in data["workers"]] == ["w1"]
    # The engine serves on a Unix socket of the worker's (ENGINE_SOCKETS=unix, the default).
    inst = data["models"][0]["instances"][0]
    assert inst["socket"].endswith(".sock") and inst["port"] == "0"

    r = svllm(router, "models", "show", "m1", token=TOKEN)
    assert r.code == 0 and "idle_sleep_s" in r.out and "600" in r.out
    shown = json.loads(svllm(router, "models", "show", "m1", "--json", token=TOKEN).out)
    assert shown["spec"]["idle_sleep_s"] == 600
    listed = json.loads(svllm(router, "models", "ls", "--json", token=TOKEN).out)
    assert [m["alias"] for m in listed] == ["m1"]

    r = svllm(router, "logs", "m1", token=TOKEN)
    assert r.code == 0 and "model loaded" in r.out, r.err

    # -f prints what the engine writes after it started: the sleep it is told to do.
    follower = spawn_svllm(router, "logs", "m1", "-f", "--interval", "0.2", token=TOKEN)
    try:
        q = lines_of(follower)
        wait_line(q, "Application startup complete")
        assert svllm(router, "models", "sleep", "m1", token=TOKEN).code == 0
        wait_line(q, "engine asleep (level 1)")
    finally:
        follower.terminate()
        follower.wait(timeout=10)
    wait_until(lambda: state(router, "m1") == "SLEEPING", 20, what="m1 sleeping")

    r = svllm(router, "models", "wake", "m1", "--wait", "--timeout", "60", token=TOKEN)
    assert r.code == 0 and "m1 serving on w1" in r.out, r.out + r.err

    r = svllm(router, "models", "stop", "m1", token=TOKEN)
    assert r.code == 0 and "m1: stopping" in r.out
    wait_until(lambda: state(router, "m1") == "STOPPED", 20, what="m1 stopped")

    r = svllm(router, "top", "--iterations", "2", "--interval", "0.1", token=TOKEN)
    assert r.code == 0 and "m1" in r.out and "STOPPED" in r.out, r.err

    r = svllm(router, "models", "rm", "m1", token=TOKEN)
    assert r.code == 0 and "m1: deleted" in r.out
    assert state(router, "m1") is None


def test_wait_reports_a_failed_start_with_exit_code_1(router: Proc) -> None:
    r = svllm(router, "models", "register", "broken", "sim/broken", "--engine", "sim",
              "--extra-arg=--fail-startup", "--wait", "--timeout", "60", token=TOKEN)
    assert r.code == 1, r.out + r.err
    assert "broken: registered" in r.out
    assert r.err.startswith("svllm: error: broken failed on w1: ") and r.err.count("\n") == 1
    # A scale-to-zero model: the wait ends at once, saying why, instead of waiting it out.
    r = svllm(router, "models", "register", "lazy", "sim/lazy", "--engine", "sim",
              "--min-replicas", "0", "--wait", token=TOKEN)
    assert r.code == 0 and "lazy is COLD (min_replicas 0)" in r.out, r.out + r.err


def test_errors_are_one_line_with_the_apis_message_and_change_nothing(
        router: Proc, cluster: Cluster) -> None:
    before = snapshot(cluster.redis_url, cluster.prefix)
    cases = [
        (["status"], None, "missing or invalid bearer token (401"),
        (["models", "register", "bad/alias", "sim/x", "--engine", "sim"], TOKEN,
         "alias: String should match pattern"),
        (["models", "register", "ok", "sim/x", "--engine", "sim", "--set", "colour=red"],
         TOKEN, "colour: Extra inputs are not permitted (400"),
        (["models", "register", "ok", "sim/x", "--engine", "sim", "--extra-arg=--port"],
         TOKEN, "--port"),
        (["models", "rm", "nope"], TOKEN, "model 'nope' is not registered (404"),
        (["models", "wake", "nope"], TOKEN, "model 'nope' is not registered"),
        (["models", "show", "nope"], TOKEN, "model 'nope' is not registered"),
        (["logs", "nope"], TOKEN, "model 'nope' is not registered"),
    ]
    for args, token, message in cases:
        r = svllm(router, *args, token=token)
        assert r.code == 1, (args, r.out, r.err)
        assert message in r.err, (args, r.err)
        assert r.err.startswith("svllm: error: ") and r.err.count("\n") == 1, r.err
    assert snapshot(cluster.redis_url, cluster.prefix) == before


def test_unreachable_router_is_one_line(router: Proc) -> None:
    r = svllm(router, "--url", "http://127.0.0.1:9", "status", token=TOKEN)
    assert r.code == 1 and r.err.startswith("svllm: error: cannot reach the router")
