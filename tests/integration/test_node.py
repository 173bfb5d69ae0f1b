"""services.node: router and worker in one process (real redis-server, manager, node, plain
worker, sim engines, real HTTP). Its own replicas get their requests by a call, the others'
over HTTP; an in-process request holds the idle clock and a sleep's drain like a proxied
one; one SIGTERM ends both servers and the engines; ROUTER_PROCESSES > 1 is refused."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
from typing import Any

import httpx
import redis

from shared.keys import Keys
from tests.support import (
    ROOT,
    Cluster,
    Proc,
    RedisServer,
    chat,
    engine_call,
    engines,
    free_port,
    model_status,
    register,
    running_on,
    sim_stats,
    wait_serving,
    wait_until,
)


def _health(node: Proc) -> dict[str, Any]:
    return dict(httpx.get(f"{node.url}/health", timeout=10).json())


def _stream(node: Proc, alias: str, max_tokens: int) -> list[str]:
    body = {"model": alias, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hello there"}]}
    with httpx.stream("POST", f"{node.url}/v1/chat/completions", json=body,
                      timeout=60) as resp:
        assert resp.status_code == 200, resp.read()
        return [line for line in resp.iter_lines() if line.startswith("data: ")]


def _instance(node: Proc, alias: str) -> dict[str, Any]:
    m = model_status(node, alias)
    assert m is not None and len(m["instances"]) == 1, m
    return dict(m["instances"][0])


def test_its_own_replicas_are_served_in_process_and_others_over_http(cluster: Cluster) -> None:
    cluster.manager()
    node = cluster.node("w1")
    cluster.worker("w2")
    assert register(node, "pair", engine="sim", replicas=2).status_code == 201
    wait_until(lambda: sorted(engines(node, "pair")) == ["w1", "w2"], 30, what="two replicas")
    wait_serving(node, "pair")
    health = _health(node)
    assert health["worker"] == "w1"
    before = health["in_process_requests"]
    ports = engines(node, "pair")
    on_w2 = sim_stats(ports["w2"])["requests"]

    replies = [chat(node, "pair") for _ in range(20)]
    assert [r.status_code for r in replies] == [200] * 20
    data = _stream(node, "pair", 8)
    assert data[-1] == "data: [DONE]"

    in_process = _health(node)["in_process_requests"] - before
    over_http = sim_stats(ports["w2"])["requests"] - on_w2
    # Every request went one way or the other, and each way was taken.
    assert in_process + over_http == 21, (in_process, over_http)
    assert in_process > 0 and over_http > 0


def test_an_in_process_replica_that_fails_hands_the_request_to_another(
        cluster: Cluster) -> None:
    cluster.manager()
    # No health check meanwhile: it would take the failing replica's route away, and with it
    # the in-process attempts this test is about.
    node = cluster.node("w1", ENGINE_HEALTH_INTERVAL_S="600")
    cluster.worker("w2")
    assert register(node, "pair", engine="sim", replicas=2).status_code == 201
    wait_until(lambda: sorted(engines(node, "pair")) == ["w1", "w2"], 30, what="two replicas")
    wait_serving(node, "pair")
    ports = engines(node, "pair")
    r = engine_call(ports["w1"], "POST", "/sim/fault", json={"dead": True})
    assert r.status_code == 200
    ids = [f"node-failover-{i}" for i in range(6)]
    before = _health(node)["in_process_requests"]
    replies = [chat_with_id(node, "pair", rid) for rid in ids]
    assert [x.status_code for x in replies] == [200] * 6, [x.text for x in replies]
    # Each answered by the HTTP replica; some first tried in process, where the engine got
    # the request's id as the worker's proxy would have given it, and answered 500.
    on_w1 = set(sim_stats(ports["w1"])["request_ids"]) & set(ids)
    assert set(ids) <= set(sim_stats(ports["w2"])["request_ids"])
    assert on_w1, "no request was tried on the in-process replica first"
    assert _health(node)["in_process_requests"] - before == len(on_w1)


def chat_with_id(node: Proc, alias: str, request_id: str) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}
    return httpx.post(f"{node.url}/v1/chat/completions", json=body, timeout=30,
                      headers={"x-request-id": request_id})


def test_an_in_process_stream_counts_in_flight_and_holds_a_sleep(cluster: Cluster) -> None:
    cluster.manager()
    node = cluster.node("w1")
    assert register(node, "slow", engine="sim", idle_sleep_s=600,
                    extra_args=["--itl", "0.05"]).status_code == 201
    wait_serving(node, "slow")
    got: list[list[str]] = []
    reader = threading.Thread(target=lambda: got.append(_stream(node, "slow", 60)))
    reader.start()
    try:
        # Counted by the worker while the answer streams (what idle sleep, autoscaling and
        # the drain read), though no request reached its HTTP proxy.
        wait_until(lambda: _instance(node, "slow")["inflight"] == "1", 10, interval=0.05,
                   what="the stream counted in flight")
        r = httpx.post(f"{node.url}/admin/models/slow/sleep", timeout=10)
        assert r.status_code == 202, r.text
        # The drain waits for the stream: the model stays RUNNING until it has ended.
        while reader.is_alive():
            assert _instance(node, "slow")["state"] == "RUNNING"
            reader.join(0.1)
    finally:
        reader.join(30)
    assert len(got) == 1 and got[0][-1] == "data: [DONE]"
    assert not any('"error"' in line for line in got[0])
    wait_until(lambda: _instance(node, "slow")["state"] == "SLEEPING", 10, what="asleep")
    assert _instance(node, "slow")["inflight"] == "0"
    assert chat(node, "slow").status_code == 200  # woken by a request, served in process


def test_the_routers_read_timeout_holds_in_process(cluster: Cluster) -> None:
    cluster.manager()
    node = cluster.node("w1", UPSTREAM_READ_TIMEOUT_S="1")
    assert register(node, "late", engine="sim", extra_args=["--ttft", "4"]).status_code == 201
    wait_until(lambda: running_on(node, "late") == ["w1"], 30, what="running")
    # The worker's own proxy waits an hour on an engine; the router's requests wait as long
    # as the router's UPSTREAM_READ_TIMEOUT_S says, in process too.
    r = chat(node, "late")
    assert r.status_code == 504, r.text
    assert r.json()["error"]["code"] == "upstream_timeout"
    assert _health(node)["in_process_requests"] >= 1


def test_one_sigterm_stops_router_worker_and_engines(cluster: Cluster) -> None:
    cluster.manager()
    node = cluster.node("w1")
    assert register(node, "m", engine="sim", extra_args=["--itl", "0.05"]).status_code == 201
    wait_serving(node, "m")
    engine_pid = int(_instance(node, "m")["pid"])
    got: list[list[str] | BaseException] = []

    def read() -> None:
        try:
            got.append(_stream(node, "m", 40))
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            got.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: _instance(node, "m")["inflight"] == "1", 10, interval=0.05,
                   what="a stream in flight")
        assert node.popen is not None
        os.kill(node.popen.pid, signal.SIGTERM)  # the node alone, not its process group
        node.popen.wait(timeout=30)
    finally:
        reader.join(30)
    # The router drained its stream (2 s, within its graceful shutdown) before the worker
    # stopped the engine that was sending it.
    assert len(got) == 1 and isinstance(got[0], list), got
    assert got[0][-1] == "data: [DONE]" and not any('"error"' in x for x in got[0]), got

    def gone(pid: int) -> bool:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        with open(f"/proc/{pid}/stat") as f:  # a zombie is gone too
            return f.read().rsplit(")", 1)[1].split()[0] == "Z"

    wait_until(lambda: gone(engine_pid), 10, what="the engine stopped")
    for port in (node.env["ROUTER_PORT"], node.env["WORKER_PORT"]):
        try:
            httpx.get(f"http://127.0.0.1:{port}/health", timeout=1)
        except httpx.HTTPError:
            continue
        raise AssertionError(f"port {port} still answers")


def test_a_failed_start_of_one_server_shuts_the_other_down_in_order(
        cluster: Cluster, redis_server: RedisServer) -> None:
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen()
    try:
        env = cluster.env(WORKER_ID="w1", WORKER_HOST="127.0.0.1", WORKER_PORT=str(free_port()),
                          ROUTER_HOST="127.0.0.1", ROUTER_PORT=str(taken.getsockname()[1]))
        done = subprocess.run([sys.executable, "-m", "services.node.main"], env=env,
                              cwd=ROOT, capture_output=True, text=True, timeout=60,
                              check=False, start_new_session=True)
    finally:
        taken.close()
    assert done.returncode == 3, done.stderr[-2000:]
    assert "address already in use" in done.stderr
    # The worker, started beside the router, ran its shutdown: its heartbeat is withdrawn
    # (a process killed by the failure would have left it to expire).
    r = redis.Redis.from_url(redis_server.url)
    assert r.exists(Keys(cluster.prefix).worker_alive("w1")) == 0
    assert "Traceback" not in done.stderr


def test_more_than_one_router_process_is_refused(cluster: Cluster) -> None:
    env = cluster.env(ROUTER_PROCESSES="2", WORKER_ID="w1")
    done = subprocess.run([sys.executable, "-m", "services.node.main"], env=env, cwd=ROOT,
                          capture_output=True, text=True, timeout=60, check=False,
                          start_new_session=True)
    assert done.returncode != 0
    assert "ROUTER_PROCESSES" in done.stderr
