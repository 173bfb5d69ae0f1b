"""Test support: real redis-server and real service processes on free loopback ports."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import pytest
import redis

from shared import procs

ROOT = Path(__file__).resolve().parent.parent
T = TypeVar("T")

# Fast timers so failure detection and convergence take a second or two, not minutes.
FAST_ENV = {
    # One router process unless a test asks for more (tests/integration/test_processes.py).
    "ROUTER_PROCESSES": "1",
    "HEARTBEAT_INTERVAL_S": "0.3",
    "HEARTBEAT_TTL_S": "1.5",
    "SCHEDULE_INTERVAL_S": "0.3",
    "LEASE_TTL_S": "1.5",
    "RECONCILE_INTERVAL_S": "0.3",
    "ROUTE_REFRESH_S": "0.3",
    "ENGINE_RETRY_BASE_S": "0.5",
    "ENGINE_STOP_GRACE_S": "3",
    "LOG_FORMAT": "text",
    "LOG_LEVEL": "INFO",
    "GPU_BACKEND": "none",
    "WORKER_ENGINES": "sim",
    "DEFAULT_ENGINE": "sim",
}


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_until(
    check: Callable[[], T | None], timeout: float = 15.0, interval: float = 0.05, what: str = ""
) -> T:
    """Poll ``check`` until it returns something truthy; fail with ``what`` at the deadline."""
    deadline = time.monotonic() + timeout
    last_exc: Exception | None = None
    while time.monotonic() < deadline:
        try:
            value = check()
            if value:
                return value
        except Exception as e:  # noqa: BLE001 - the condition may not be checkable yet
            last_exc = e
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what or check}: {last_exc}")


@dataclass
class Proc:
    name: str
    argv: list[str]
    env: dict[str, str]
    log: Path
    url: str = ""
    popen: subprocess.Popen[bytes] | None = None

    def start(self, health_timeout: float = 30.0) -> Proc:
        self.popen = procs.spawn(self.argv, log_path=self.log, env=self.env, cwd=ROOT)
        if self.url:
            wait_until(self._healthy, health_timeout, what=f"{self.name} health\n{self.tail()}")
        return self

    def _healthy(self) -> bool:
        assert self.popen is not None
        if self.popen.poll() is not None:
            raise AssertionError(f"{self.name} exited with {self.popen.returncode}:\n{self.tail()}")
        return httpx.get(f"{self.url}/health", timeout=1.0).status_code == 200

    def stop(self) -> None:
        if self.popen is not None:
            procs.stop(self.popen, grace_s=10)

    def kill9(self) -> None:
        """SIGKILL the service process alone (not its group): a crash, engines orphaned."""
        assert self.popen is not None
        self.popen.kill()
        self.popen.wait(timeout=5)

    def tail(self, n: int = 40) -> str:
        return procs.tail(self.log, n)


@dataclass
class RedisServer:
    port: int
    dir: Path
    proc: Proc | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    @staticmethod
    def binary() -> str:
        found = shutil.which("redis-server")
        assert found, "redis-server is not installed (scripts/test.sh installs it)"
        return found

    def start(self, appendonly: bool = False, extra: list[str] | None = None) -> RedisServer:
        self.dir.mkdir(parents=True, exist_ok=True)
        argv = [self.binary(), "--port", str(self.port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "yes" if appendonly else "no", "--dir", str(self.dir),
                *(extra or [])]
        self.proc = Proc("redis", argv, dict(os.environ), self.dir / "redis.log").start()
        # A deadline, not a wait: a loaded machine (the suite in parallel) can take seconds.
        wait_until(self.ping, 30, what="redis-server")
        return self

    def ping(self) -> bool:
        with socket.create_connection(("127.0.0.1", self.port), timeout=1) as s:
            s.sendall(b"PING\r\n")
            return s.recv(16).startswith(b"+PONG")

    def stop(self) -> None:
        if self.proc:
            self.proc.stop()


@dataclass
class Cluster:
    """Real service processes sharing one Redis, with a per-test key prefix."""

    redis_url: str
    prefix: str
    tmp: Path
    extra_env: dict[str, str] = field(default_factory=dict)
    procs: list[Proc] = field(default_factory=list)

    def env(self, **over: str) -> dict[str, str]:
        base = {k: v for k, v in os.environ.items()
                if not k.startswith(("REDIS_", "ADMIN_", "INTERNAL_", "API_", "ALLOW_"))}
        return base | FAST_ENV | {"REDIS_URL": self.redis_url, "REDIS_PREFIX": self.prefix,
                                  "STATE_DIR": str(self.tmp / "state")} | self.extra_env | over

    def _service(self, name: str, module: str, port: int, env: dict[str, str]) -> Proc:
        p = Proc(name, [sys.executable, "-m", module], env, self.tmp / f"{name}.log",
                 url=f"http://127.0.0.1:{port}")
        self.procs.append(p)
        return p.start()

    def manager(self, name: str = "manager", **env: str) -> Proc:
        port = free_port()
        e = self.env(MANAGER_HOST="127.0.0.1", MANAGER_PORT=str(port), MANAGER_ID=name, **env)
        return self._service(name, "services.manager.main", port, e)

    def worker(self, worker_id: str = "w1", **env: str) -> Proc:
        port = free_port()
        e = self.env(WORKER_ID=worker_id, WORKER_HOST="127.0.0.1", WORKER_PORT=str(port), **env)
        return self._service(worker_id, "services.worker.main", port, e)

    def router(self, name: str = "router", **env: str) -> Proc:
        port = free_port()
        e = self.env(ROUTER_HOST="127.0.0.1", ROUTER_PORT=str(port), **env)
        return self._service(name, "services.router.main", port, e)

    def node(self, worker_id: str = "w1", **env: str) -> Proc:
        """Router and worker in one process (services.node); its url is the router's, and
        ``env["WORKER_PORT"]`` the worker's port."""
        port, worker_port = free_port(), free_port()
        e = self.env(WORKER_ID=worker_id, WORKER_HOST="127.0.0.1", WORKER_PORT=str(worker_port),
                     WORKER_URL=f"http://127.0.0.1:{worker_port}", ROUTER_HOST="127.0.0.1",
                     ROUTER_PORT=str(port), **env)
        return self._service(f"node-{worker_id}", "services.node.main", port, e)

    def stop_all(self) -> None:
        for p in reversed(self.procs):
            p.stop()

    def logs(self) -> str:
        return "\n".join(f"--- {p.name}\n{p.tail(60)}" for p in self.procs)


def register(router: Proc, alias: str, token: str | None = None, **spec: Any) -> httpx.Response:
    body = {"alias": alias, "model_name": spec.pop("model_name", f"sim/{alias}")} | spec
    headers = {"authorization": f"Bearer {token}"} if token else {}
    return httpx.post(f"{router.url}/admin/models/register", json=body, headers=headers,
                      timeout=10)


def status(router: Proc, token: str | None = None) -> dict[str, Any]:
    headers = {"authorization": f"Bearer {token}"} if token else {}
    r = httpx.get(f"{router.url}/admin/status", headers=headers, timeout=10)
    r.raise_for_status()
    return dict(r.json())


def model_status(router: Proc, alias: str, token: str | None = None) -> dict[str, Any] | None:
    for m in status(router, token)["models"]:
        if m["alias"] == alias:
            return dict(m)
    return None


def engine_address(inst: dict[str, str]) -> str:
    """Where the engine of an instance record serves: its Unix socket's path (the worker's
    default) or, for one on a loopback port, ``127.0.0.1:PORT``."""
    return inst.get("socket") or f"127.0.0.1:{int(inst['port'])}"


def engine_http(address: str, timeout: float = 5) -> httpx.Client:
    """A client for the engine at ``address`` (see :func:`engine_address`); paths are
    relative to the engine's root."""
    if address.startswith("/"):
        return httpx.Client(transport=httpx.HTTPTransport(uds=address),
                            base_url="http://localhost", timeout=timeout)
    return httpx.Client(base_url=f"http://{address}", timeout=timeout)


def engine_call(address: str, method: str, path: str, **kwargs: Any) -> httpx.Response:
    with engine_http(address) as client:
        return client.request(method, path, **kwargs)


def engines(router: Proc, alias: str) -> dict[str, str]:
    """worker -> address of the RUNNING simulated engine of ``alias`` there."""
    m = model_status(router, alias)
    assert m is not None
    return {i["worker_id"]: engine_address(i) for i in m["instances"]
            if i["state"] == "RUNNING"}


def sim_stats(address: str) -> dict[str, Any]:
    return dict(engine_call(address, "GET", "/sim/stats").json())


def running_on(router: Proc, alias: str, token: str | None = None) -> list[str]:
    """Worker ids whose instance of ``alias`` is RUNNING."""
    m = model_status(router, alias, token)
    if not m:
        return []
    return [i["worker_id"] for i in m["instances"] if i.get("state") == "RUNNING"]


def chat(router: Proc, alias: str, **extra: Any) -> httpx.Response:
    body = {"model": alias, "messages": [{"role": "user", "content": "hello there"}],
            "max_tokens": 5} | extra
    return httpx.post(f"{router.url}/v1/chat/completions", json=body, timeout=30)


def wait_serving(router: Proc, alias: str, timeout: float = 30.0) -> None:
    """Until a chat completion through the router succeeds."""
    wait_until(lambda: chat(router, alias).status_code == 200, timeout,
               interval=0.1, what=f"{alias} serving")


def child_pids(pid: int) -> list[int]:
    """Direct children of ``pid`` (from /proc), e.g. the engines a worker started."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        # The command name may contain spaces: the fields after the last ')' are fixed.
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:
            out.append(int(entry.name))
    return out


_USAGE_FIELDS = ("updated_at", "inflight", "last_request_at")


def snapshot(redis_url: str, prefix: str) -> dict[str, Any]:
    """The pool's desired and observed state, minus what heartbeats rewrite all the time."""
    r = redis.Redis.from_url(redis_url, decode_responses=True)
    state: dict[str, Any] = {}
    try:
        for key in r.scan_iter(f"{prefix}:*"):
            # worker:revs counts the workers' own record writes (a full beat every RESYNC_S
            # moves it): heartbeat bookkeeping, like the {w:...} keys.
            if ":{w:" in key or key.endswith((":workers", ":lease", ":worker:revs")):
                continue
            kind = str(r.type(key))
            readers: dict[str, Callable[[str], Any]] = {
                "hash": r.hgetall, "set": r.smembers, "string": r.get,
                "list": lambda k: r.lrange(k, 0, -1), "zset": lambda k: r.zrange(k, 0, -1),
                "stream": r.xrange}
            value = readers[kind](key)
            if ":instance:" in key:
                # Request accounting moves with traffic sent before the snapshot; not state.
                value = {k: v for k, v in value.items() if k not in _USAGE_FIELDS}
            state[key] = value
    finally:
        r.close()
    return state


def stays(check: Callable[[], object], seconds: float, interval: float = 0.05,
          what: str = "") -> None:
    """Assert ``check`` holds at every poll for ``seconds``: for claims that nothing changes
    (a scheduler pass must not undo something, a route set must not flap)."""
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        assert check(), f"stopped holding: {what or check}"
        time.sleep(interval)


def running_or_failed(router: Proc, alias: str) -> dict[str, Any] | None:
    """The alias's first instance once RUNNING; fails the test at once if it is FAILED (the
    worker retries with back-off, but a real engine's start failure will not heal)."""
    m = model_status(router, alias)
    inst = m["instances"][0] if m and m["instances"] else None
    if inst and inst["state"] == "FAILED":
        # pytest.fail, not an assertion: wait_until retries on ordinary exceptions.
        pytest.fail(f"engine FAILED: {inst.get('error')}\n--- log tail\n{inst.get('log_tail')}")
    return dict(inst) if inst and inst["state"] == "RUNNING" else None
