"""Bad input gets the right 4xx in the OpenAI error shape, spawns nothing, changes nothing."""

from __future__ import annotations

import httpx
import pytest
import redis

from shared.keys import Keys
from tests.support import Cluster, child_pids, register, snapshot, wait_serving, wait_until

TOKEN = "admin-secret"
AUTH = {"authorization": f"Bearer {TOKEN}"}
JSON = {"content-type": "application/json"}


@pytest.fixture
def pool(cluster: Cluster):
    cluster.extra_env.update(ADMIN_TOKEN=TOKEN, MAX_BODY_BYTES="65536")
    cluster.manager()
    worker = cluster.worker("w1")
    router = cluster.router()
    assert register(router, "good", token=TOKEN, engine="sim").status_code == 201
    wait_serving(router, "good")
    # Settled: the worker's first reports of the new engine (its load, on its reconcile
    # timer) are in, so the snapshots below see only what a bad request might change.
    r = redis.Redis.from_url(cluster.redis_url, decode_responses=True)
    try:
        wait_until(lambda: r.hexists(Keys(cluster.prefix).load("good"), "w1"), 10,
                   what="the worker reports the engine's load")
    finally:
        r.close()
    return cluster, router, worker


def reg(body: object) -> tuple[str, str, object, dict[str, str]]:
    return ("POST", "/admin/models/register", body, AUTH)


def chat_body(model: object) -> dict[str, object]:
    return {"model": model, "messages": [{"role": "user", "content": "hi"}]}


CASES = [
    # (name, method, path, body, headers, status)
    ("malformed json", "POST", "/v1/chat/completions", b"{not json", JSON, 400),
    ("json array", "POST", "/v1/chat/completions", b"[1,2]", JSON, 400),
    ("no model", "POST", "/v1/chat/completions", {"messages": []}, {}, 400),
    ("model not a string", "POST", "/v1/chat/completions", chat_body(5), {}, 400),
    ("unknown model", "POST", "/v1/chat/completions", chat_body("nope"), {}, 404),
    ("flag as model", "POST", "/v1/completions", chat_body("--foo"), {}, 404),
    ("path as model", "POST", "/v1/embeddings", chat_body("../x"), {}, 404),
    ("huge body", "POST", "/v1/chat/completions", b"{" + b" " * 70000 + b"}", JSON, 413),
    ("register no token", "POST", "/admin/models/register",
     {"alias": "a", "model_name": "o/a"}, {}, 401),
    ("register wrong token", "POST", "/admin/models/register",
     {"alias": "a", "model_name": "o/a"}, {"authorization": "Bearer nope"}, 401),
    ("status no token", "GET", "/admin/status", None, {}, 401),
    ("register malformed", "POST", "/admin/models/register", b"{", JSON | AUTH, 400),
    ("register flag alias", *reg({"alias": "--foo", "model_name": "o/a"}), 400),
    ("register path alias", *reg({"alias": "../x", "model_name": "o/a"}), 400),
    ("register flag model", *reg({"alias": "a", "model_name": "--foo"}), 400),
    ("register path model", *reg({"alias": "a", "model_name": "../x"}), 400),
    ("register bad engine", *reg({"alias": "a", "model_name": "o/a", "engine": "bash"}), 400),
    ("register bad arg", *reg({"alias": "a", "model_name": "o/a", "engine": "sim",
                               "extra_args": ["--port", "1"]}), 400),
    ("register arg injection", *reg({"alias": "a", "model_name": "o/a", "engine": "sim",
                                     "extra_args": ["--dtype", "x; rm -rf /"]}), 400),
    ("register unknown field", *reg({"alias": "a", "model_name": "o/a", "shell": "x"}), 400),
    ("register bad util", *reg({"alias": "a", "model_name": "o/a",
                                "gpu_memory_utilization": 3}), 400),
    ("register conflict", *reg({"alias": "good", "model_name": "o/other", "engine": "sim"}), 409),
    ("delete unknown", "DELETE", "/admin/models/nope", None, AUTH, 404),
    ("delete hostile", "DELETE", "/admin/models/--foo", None, AUTH, 404),
    ("no such route", "GET", "/v2/whatever", None, {}, 404),
    ("wrong method", "GET", "/v1/chat/completions", None, {}, 405),
]


def send(base: str, method: str, path: str, body: object, headers: dict[str, str]):
    if isinstance(body, bytes):
        return httpx.request(method, base + path, content=body, headers=headers, timeout=10)
    return httpx.request(method, base + path, json=body, headers=headers, timeout=10)


def test_bad_inputs_table(pool) -> None:
    cluster, router, worker = pool
    before = snapshot(cluster.redis_url, cluster.prefix)
    engines_before = child_pids(worker.popen.pid)
    assert len(engines_before) == 1
    failures = []
    for name, method, path, body, headers, want in CASES:
        r = send(router.url, method, path, body, headers)
        err = r.json().get("error") if r.headers.get("content-type", "").startswith(
            "application/json") else None
        if r.status_code != want or not err or set(err) != {"message", "type", "param", "code"}:
            failures.append(f"{name}: got {r.status_code} {r.text[:200]}")
    assert not failures, "\n".join(failures)
    assert snapshot(cluster.redis_url, cluster.prefix) == before
    assert child_pids(worker.popen.pid) == engines_before


def test_worker_endpoints_bad_input(pool) -> None:
    cluster, _router, worker = pool
    before = snapshot(cluster.redis_url, cluster.prefix)
    engines_before = child_pids(worker.popen.pid)
    cases = [
        ("POST", "/instances/start", {"alias": "good"}, {}, 401),
        ("POST", "/instances/start", {"alias": "--foo"}, AUTH, 400),
        ("POST", "/instances/start", {"alias": "nope"}, AUTH, 404),
        ("POST", "/instances/start", b"{", JSON | AUTH, 400),
        ("POST", "/instances/nope/stop", None, AUTH, 404),
        ("POST", "/instances/..%2Fx/stop", None, AUTH, 404),
        ("POST", "/proxy/good/sleep", b"", {}, 404),
        ("POST", "/proxy/good/wake_up", b"", {}, 404),
        ("GET", "/proxy/good/v1/chat/completions", None, {}, 404),
        ("POST", "/proxy/nope/v1/chat/completions", chat_body("nope"), {}, 503),
    ]
    for method, path, body, headers, want in cases:
        r = send(worker.url, method, path, body, headers)
        assert r.status_code == want, (path, r.status_code, r.text)
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    assert snapshot(cluster.redis_url, cluster.prefix) == before
    assert child_pids(worker.popen.pid) == engines_before
