"""The router's data path with replicas: engine 500s retried and counted per (model, worker),
and the x-request-id every answer carries, on the fast lane and through ASGI."""

from __future__ import annotations

import json
import os
import signal
import socket
import threading

import httpx
import pytest

from tests.support import (
    Cluster,
    Proc,
    chat,
    engine_call,
    engines,
    register,
    running_on,
    sim_stats,
    wait_until,
)


def two_replicas(router: Proc, alias: str) -> dict[str, str]:
    assert register(router, alias, engine="sim", replicas=2).status_code == 201
    wait_until(lambda: sorted(running_on(router, alias)) == ["w1", "w2"], 30,
               what=f"two replicas of {alias}")
    wait_until(lambda: all(chat(router, alias).status_code == 200 for _ in range(4)), 10,
               what=f"routes of {alias} seen")
    return engines(router, alias)


def stream_text(router: Proc, alias: str, max_tokens: int = 5) -> tuple[int, str]:
    body = {"model": alias, "stream": True, "max_tokens": max_tokens,
            "messages": [{"role": "user", "content": "hi"}]}
    with httpx.stream("POST", f"{router.url}/v1/chat/completions", json=body,
                      timeout=30) as resp:
        text = "".join(resp.iter_text())
    return resp.status_code, text


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_engine_500_is_retried_and_ejects_only_that_models_replica(
    cluster: Cluster, fast_lane: str
) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router(FAST_LANE=fast_lane, BREAKER_COOLDOWN_S="120")
    flaky = two_replicas(router, "flaky")
    steady = two_replicas(router, "steady")
    # The engine's API server answers, but every request on w1 fails with a 500 (an engine
    # core that died behind a live API server).
    r = engine_call(flaky["w1"], "POST", "/sim/faults", json={"fail_rate": 1.0})
    assert r.status_code == 200

    codes = [chat(router, "flaky").status_code for _ in range(20)]
    assert codes == [200] * 20  # no client sees the 500: retried on w2 before any byte
    for _ in range(5):
        code, text = stream_text(router, "flaky")
        assert code == 200 and "[DONE]" in text and "error" not in text
    ejected = httpx.get(f"{router.url}/admin/status").json()["router"]["ejected"]
    assert [(e["model"], e["worker"]) for e in ejected] == [("flaky", "w1")]

    # The breaker is per (model, worker): steady keeps being routed to w1.
    before = sim_stats(steady["w1"])["requests"]
    assert all(chat(router, "steady").status_code == 200 for _ in range(20))
    assert sim_stats(steady["w1"])["requests"] - before >= 3


def test_every_replica_failing_gives_a_502_with_the_reason(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    cluster.worker("w2")
    router = cluster.router()
    ports = two_replicas(router, "down")
    for port in ports.values():
        engine_call(port, "POST", "/sim/faults", json={"fail_rate": 1.0})
    r = chat(router, "down")
    assert r.status_code == 502, r.text
    assert "simulated engine failure" in r.json()["error"]["message"]


@pytest.mark.parametrize("fast_lane", ["true", "false"])
def test_every_answer_carries_the_request_id(cluster: Cluster, fast_lane: str) -> None:
    cluster.extra_env["INTERNAL_TOKEN"] = "inner"
    cluster.manager()
    worker = cluster.worker("w1", FAST_LANE=fast_lane)
    router = cluster.router(FAST_LANE=fast_lane)
    assert register(router, "rid", engine="sim").status_code == 201
    wait_until(lambda: chat(router, "rid").status_code == 200, 30, what="rid serving")
    port = engines(router, "rid")["w1"]
    url = f"{router.url}/v1/chat/completions"
    body = {"model": "rid", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 3}

    # The client's valid id comes back, and it is the one the engine got.
    for stream in (False, True):
        r = httpx.post(url, json=body | {"stream": stream}, timeout=30,
                       headers={"x-request-id": "trace-7.a:b"})
        assert r.status_code == 200 and r.headers["x-request-id"] == "trace-7.a:b"
        assert sim_stats(port)["last_request_id"] == "trace-7.a:b"
    # None sent, or an invalid one: a generated id, the same the engine got.
    for headers in ({}, {"x-request-id": "has space"}, {"x-request-id": "x" * 200}):
        r = httpx.post(url, json=body, timeout=30, headers=headers)
        rid = r.headers["x-request-id"]
        assert len(rid) == 32 and rid != headers.get("x-request-id")
        assert sim_stats(port)["last_request_id"] == rid
    # Errors carry it too: unknown model (404), bad JSON (400), an engine error (400).
    for payload in (json.dumps(body | {"model": "nope"}), "{not json",
                    json.dumps(body | {"messages": []})):
        r = httpx.post(url, content=payload, timeout=30,
                       headers={"x-request-id": "err-1", "content-type": "application/json"})
        assert r.status_code in (400, 404) and r.headers["x-request-id"] == "err-1", r.text
    # The worker's proxy answers with it as well, errors included.
    wurl = f"{worker.url}/proxy/rid/v1/chat/completions"
    auth = {"authorization": "Bearer inner"}
    r = httpx.post(wurl, json=body, headers={"x-request-id": "direct-1"} | auth, timeout=30)
    assert r.status_code == 200 and r.headers["x-request-id"] == "direct-1"
    r = httpx.post(f"{worker.url}/proxy/other/v1/chat/completions", json=body,
                   headers={"x-request-id": "direct-2"} | auth, timeout=30)
    assert r.status_code == 503 and r.headers["x-request-id"] == "direct-2"
    r = httpx.post(wurl, json=body, headers={"x-request-id": "direct-3"}, timeout=30)
    assert r.status_code == 401 and r.headers["x-request-id"] == "direct-3"


def _raw_stream(url: str, alias: str, close: bool) -> bytes:
    """A streamed chat sent over a raw socket (``Connection: close`` when ``close``), read
    until the router closes or ends the answer; the answer's bytes, head included."""
    host, port = url.removeprefix("http://").split(":")
    body = json.dumps({"model": alias, "stream": True, "max_tokens": 5,
                       "messages": [{"role": "user", "content": "hi"}]}).encode()
    head = (f"POST /v1/chat/completions HTTP/1.1\r\nhost: {host}\r\n"
            f"content-type: application/json\r\ncontent-length: {len(body)}\r\n"
            + ("connection: close\r\n" if close else "") + "\r\n").encode()
    with socket.create_connection((host, int(port)), timeout=10) as s:
        s.sendall(head + body)
        out = b""
        while not out.endswith(b"\r\n0\r\n\r\n"):
            piece = s.recv(65536)
            if not piece:
                break
            out += piece
    return out


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "connection-close"])
def test_a_streamed_answer_ends_with_its_last_chunk(cluster: Cluster, close: bool) -> None:
    # A client that asks to close the connection after the answer still gets a complete
    # chunked answer: its terminating chunk was once left out, and clients reported the
    # stream as cut ("incomplete chunked read").
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "m", engine="sim").status_code == 201
    wait_until(lambda: chat(router, "m").status_code == 200, 30, what="serving")
    raw = _raw_stream(router.url, "m", close)
    assert raw.startswith(b"HTTP/1.1 200"), raw[:200]
    assert b"transfer-encoding: chunked" in raw.lower()
    assert (b"connection: close" in raw.lower()) is close
    assert b"data: [DONE]" in raw and raw.endswith(b"\r\n0\r\n\r\n"), raw[-200:]


def test_sigterm_lets_a_stream_in_flight_finish(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "m", engine="sim", extra_args=["--itl", "0.05"]).status_code == 201
    wait_until(lambda: chat(router, "m").status_code == 200, 30, what="serving")
    got: list[str | BaseException] = []

    def read() -> None:
        try:
            got.append(stream_text(router, "m", 30)[1])
        except BaseException as e:  # noqa: BLE001 - reported by the assertion below
            got.append(e)

    reader = threading.Thread(target=read)
    reader.start()
    try:
        wait_until(lambda: got or sim_stats(engines(router, "m")["w1"])["running"] == 1, 10,
                   interval=0.05, what="a stream in flight")
        assert router.popen is not None
        os.kill(router.popen.pid, signal.SIGTERM)  # a graceful stop: streams may finish
        router.popen.wait(timeout=30)
    finally:
        reader.join(30)
    assert len(got) == 1 and isinstance(got[0], str), got
    assert got[0].rstrip().endswith("data: [DONE]") and '"error"' not in got[0], got[0][-300:]
