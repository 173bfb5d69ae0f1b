"""Auth and clean edges: non-ASCII credentials, fake workers, what is exposed without a token,
Host-built redirects, echoed input; and services that refuse to start open on the network."""

from __future__ import annotations

import os
import sys
import uuid
from pathlib import Path

import httpx
import pytest
import redis

from shared import procs
from shared.keys import Keys
from tests.security.conftest import ADMIN, API, INTERNAL, SecurePool, bearer, port_of
from tests.security.rawhttp import exchange
from tests.support import FAST_ENV, ROOT, RedisServer, free_port, wait_until

# The tests share the module-scoped pool: one pytest-xdist worker runs them all.
pytestmark = pytest.mark.xdist_group("security_auth")

REG_BODY = (b'{"worker_id": "evil", "url": "http://203.0.113.9:7000", "engines": ["sim"], '
            b'"gpus": []}')


def raw(method: bytes, path: bytes, auth: bytes | None, body: bytes = b"") -> bytes:
    head = b"%s %s HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n" % (method, path)
    if auth is not None:
        head += b"authorization: " + auth + b"\r\n"
    return head + b"content-length: %d\r\n\r\n" % len(body) + body


# Every guarded endpoint kind on every service: (service, method, path, body).
GUARDED = [
    ("router", b"GET", b"/admin/status", b""),
    ("router", b"POST", b"/v1/chat/completions", b'{"model": "x"}'),
    ("router_asgi", b"POST", b"/v1/chat/completions", b'{"model": "x"}'),
    ("router", b"GET", b"/v1/models", b""),
    ("worker", b"POST", b"/instances/x/stop", b""),
    ("worker", b"GET", b"/info", b""),
    ("worker", b"POST", b"/proxy/x/v1/chat/completions", b'{"model": "x"}'),
    ("manager", b"POST", b"/workers/register", REG_BODY),
    ("manager", b"POST", b"/workers/w1/heartbeat", b"{}"),
    ("router", b"GET", b"/metrics", b""),
    ("worker", b"GET", b"/metrics", b""),
    ("worker", b"GET", b"/metrics/engines", b""),
    ("manager", b"GET", b"/metrics", b""),
]


@pytest.mark.parametrize(("name", "method", "path", "body"), GUARDED)
@pytest.mark.parametrize("auth", [b"Bearer \xff", b"Bearer \xc3\xa9t\xc3\xa9", None,
                                  b"Bearer wrong", b"Basic " + ADMIN.encode()])
def test_bad_credentials_are_401(pool: SecurePool, name: str, method: bytes, path: bytes,
                                 body: bytes, auth: bytes | None) -> None:
    """Before: a non-ASCII bearer was a 500 and a traceback on all three services."""
    reply = exchange(port_of(pool.by_name(name)), raw(method, path, auth, body), 5)
    assert reply.status == 401, reply.raw[:300]
    assert reply.error()["type"] == "authentication_error"
    assert "Traceback" not in pool.by_name(name).tail(400)


def _workers(pool: SecurePool) -> set[str]:
    r = redis.Redis.from_url(pool.cluster.redis_url, decode_responses=True)
    try:
        return {str(w) for w in r.smembers(Keys(pool.cluster.prefix).workers)}
    finally:
        r.close()


def test_fake_worker_registration_is_refused(pool: SecurePool) -> None:
    before = _workers(pool)
    assert before == {"w1"}  # the real worker registered through the manager, with the token
    url = pool.manager.url
    for headers in ({}, bearer("wrong"), bearer(ADMIN)):
        r = httpx.post(f"{url}/workers/register", content=REG_BODY, headers=headers)
        assert r.status_code == 401, r.text
        r = httpx.post(f"{url}/workers/evil/heartbeat", json={}, headers=headers)
        assert r.status_code == 401, r.text
    assert _workers(pool) == before


@pytest.mark.parametrize("name", ["router", "router_asgi", "worker", "manager"])
def test_no_openapi_or_docs(pool: SecurePool, name: str) -> None:
    url = pool.by_name(name).url
    for path in ("/openapi.json", "/docs", "/redoc"):
        for headers in ({}, bearer(ADMIN), bearer(INTERNAL)):
            assert httpx.get(f"{url}{path}", headers=headers).status_code == 404


def test_worker_info_needs_a_token(pool: SecurePool) -> None:
    url = f"{pool.worker.url}/info"
    assert httpx.get(url).status_code == 401
    assert httpx.get(url, headers=bearer(API)).status_code == 401
    for token in (INTERNAL, ADMIN):
        r = httpx.get(url, headers=bearer(token))
        assert r.status_code == 200 and r.json()["worker_id"] == "w1"


@pytest.mark.parametrize(("name", "path", "token"), [
    ("router", "/admin/status/", ADMIN), ("router_asgi", "/v1/models/", API),
    ("worker", "/info/", INTERNAL), ("manager", "/workers/", INTERNAL)])
def test_no_redirect_built_from_host(pool: SecurePool, name: str, path: str,
                                     token: str) -> None:
    """Before: /admin/status/ answered 307 to http://<whatever Host said>/admin/status."""
    r = httpx.get(pool.by_name(name).url + path,
                  headers=bearer(token) | {"host": "evil.example"})
    assert r.status_code == 404 and "location" not in r.headers
    assert r.json()["error"]["code"] == "not_found"


def test_echoed_values_are_truncated(pool: SecurePool) -> None:
    long = "m" * 10_000
    r = httpx.post(f"{pool.router.url}/v1/chat/completions", headers=bearer(API),
                   json={"model": long, "messages": []})
    assert r.status_code == 404 and len(r.text) < 400, r.text[:500]
    r = httpx.delete(f"{pool.router.url}/admin/models/{long[:4000]}", headers=bearer(ADMIN))
    assert r.status_code == 404 and len(r.text) < 400
    r = httpx.post(f"{pool.worker.url}/proxy/a/{'p' * 6000}", headers=bearer(INTERNAL))
    assert r.status_code == 404 and len(r.text) < 1300


def test_status_shows_the_security_posture(pool: SecurePool) -> None:
    s = httpx.get(f"{pool.router.url}/admin/status", headers=bearer(ADMIN)).json()["security"]
    assert s == {"insecure": False, "bind": "127.0.0.1", "missing_tokens": [],
                 "openai_api": "token", "openai_api_open": False, "api_keys": 0}


# -- refusing to start open -----------------------------------------------------------------

SERVICE_ENV = {
    "router": ("services.router.main", "ROUTER"),
    "worker": ("services.worker.main", "WORKER"),
    "manager": ("services.manager.main", "MANAGER"),
}
NEEDS = {"router": ("ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN"),
         "worker": ("ADMIN_TOKEN", "INTERNAL_TOKEN"), "manager": ("INTERNAL_TOKEN",)}


def _env(redis_server: RedisServer, tmp: Path, service: str, port: int,
         **over: str) -> dict[str, str]:
    base = {k: v for k, v in os.environ.items()
            if not k.endswith("_TOKEN") and k not in ("ALLOW_INSECURE", "API_OPEN")}
    prefix = SERVICE_ENV[service][1]
    return base | FAST_ENV | {
        "REDIS_URL": redis_server.url, "REDIS_PREFIX": f"x{uuid.uuid4().hex[:8]}",
        "STATE_DIR": str(tmp / "state"), f"{prefix}_HOST": "0.0.0.0",
        f"{prefix}_PORT": str(port), "WORKER_ID": "exposed"} | over


@pytest.mark.parametrize("service", SERVICE_ENV)
def test_refuses_to_start_on_network_without_tokens(
        redis_server: RedisServer, tmp_path: Path, service: str) -> None:
    log = tmp_path / "out.log"
    env = _env(redis_server, tmp_path, service, free_port())
    proc = procs.spawn([sys.executable, "-m", SERVICE_ENV[service][0]], log_path=log,
                       env=env, cwd=ROOT)
    try:
        assert proc.wait(timeout=30) != 0
    finally:
        procs.stop(proc)
    text = log.read_text()
    assert "refusing to start" in text and "ALLOW_INSECURE=true" in text, text
    for name in NEEDS[service]:
        assert name in text


def test_allow_insecure_starts_warns_once_and_shows_it(
        redis_server: RedisServer, tmp_path: Path) -> None:
    port = free_port()
    log = tmp_path / "router.log"
    env = _env(redis_server, tmp_path, "router", port, ALLOW_INSECURE="true",
               ADMIN_TOKEN="a", INTERNAL_TOKEN="i")
    proc = procs.spawn([sys.executable, "-m", "services.router.main"], log_path=log, env=env,
                       cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 30,
                   what=f"router health\n{procs.tail(log)}")
        s = httpx.get(f"{url}/admin/status", headers=bearer("a")).json()["security"]
        assert s == {"insecure": True, "bind": "0.0.0.0", "missing_tokens": ["API_TOKEN"],
                     "openai_api": "open", "openai_api_open": True, "api_keys": 0}
        assert httpx.get(f"{url}/v1/models").status_code == 200  # open, as allowed
        assert log.read_text().count("INSECURE (ALLOW_INSECURE=true)") == 1
    finally:
        procs.stop(proc)


def test_api_open_is_an_explicit_choice(redis_server: RedisServer, tmp_path: Path) -> None:
    """API_OPEN=true: /v1 without a token on the network is a choice, not an accident; the
    router starts with only the admin and internal tokens and its status says so."""
    port = free_port()
    log = tmp_path / "router.log"
    env = _env(redis_server, tmp_path, "router", port, API_OPEN="true", ADMIN_TOKEN="a",
               INTERNAL_TOKEN="i")
    proc = procs.spawn([sys.executable, "-m", "services.router.main"], log_path=log, env=env,
                       cwd=ROOT)
    try:
        url = f"http://127.0.0.1:{port}"
        wait_until(lambda: httpx.get(f"{url}/health").status_code == 200, 30,
                   what=f"router health\n{procs.tail(log)}")
        s = httpx.get(f"{url}/admin/status", headers=bearer("a")).json()["security"]
        assert s == {"insecure": False, "bind": "0.0.0.0", "missing_tokens": [],
                     "openai_api": "open", "openai_api_open": True, "api_keys": 0}
        assert "INSECURE (" not in log.read_text()
    finally:
        procs.stop(proc)
