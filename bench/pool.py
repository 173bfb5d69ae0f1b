"""The pool under test: redis-server, manager, worker (with its sim engines) and router, each a
real process pinned to the server core, plus helpers to register and find models."""

from __future__ import annotations

import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from bench.procset import (
    PYTHON,
    SERVER_CORE,
    Children,
    free_port,
    need,
    pinned,
    wait_http,
    wait_tcp,
)

# One alias per engine variant: zero-latency generation and 5 ms between tokens.
ALIASES: dict[str, list[str]] = {"sim0": [], "sim5": ["--itl", "0.005"]}


@dataclass(frozen=True)
class Engine:
    alias: str
    url: str
    pid: int


@dataclass
class Pool:
    redis_url: str
    urls: dict[str, str]  # service -> base URL
    pids: dict[str, int]  # service -> pid (each leads its own process group)
    engines: dict[str, Engine] = field(default_factory=dict)


def start_redis(children: Children, data_dir: Path, name: str = "redis") -> tuple[str, int]:
    """A throwaway redis-server: free port, no persistence (nothing to fsync mid-run)."""
    binary = need("redis-server", "apt-get install redis-server")
    port = free_port()
    data_dir.mkdir(parents=True, exist_ok=True)
    argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
            "--appendonly", "no", "--dir", str(data_dir)]
    proc = children.start(name, pinned(SERVER_CORE, argv))
    wait_tcp(port, proc, children.log(name), 10)
    return f"redis://127.0.0.1:{port}/0", proc.pid


def start_redis_cluster(children: Children, data_dir: Path, primaries: int = 3) -> str:
    """A throwaway Redis Cluster of ``primaries`` nodes (on the server core, like
    :func:`start_redis`); answers REDIS_CLUSTER_NODES."""
    binary = need("redis-server", "apt-get install redis-server")
    cli = need("redis-cli", "apt-get install redis-server")
    ports = []
    for i in range(primaries):
        port, bus, d = free_port(), free_port(), data_dir / f"node{i}"
        d.mkdir(parents=True, exist_ok=True)
        argv = [binary, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                "--appendonly", "no", "--dir", str(d), "--cluster-enabled", "yes",
                "--cluster-config-file", str(d / "nodes.conf"), "--cluster-port", str(bus)]
        proc = children.start(f"redis-{i}", pinned(SERVER_CORE, argv))
        wait_tcp(port, proc, children.log(f"redis-{i}"), 10)
        ports.append(port)
    nodes = [f"127.0.0.1:{p}" for p in ports]
    subprocess.run([cli, "--cluster", "create", *nodes, "--cluster-replicas", "0",
                    "--cluster-yes"], check=True, capture_output=True, timeout=30)
    deadline = time.monotonic() + 30
    while any("cluster_state:ok" not in subprocess.run(
            [cli, "-p", str(p), "cluster", "info"], check=False, capture_output=True,
            text=True, timeout=5).stdout for p in ports):
        if time.monotonic() > deadline:
            raise RuntimeError("the Redis Cluster did not reach cluster_state:ok")
        time.sleep(0.1)
    return ",".join(nodes)


def service_env(redis_url: str, state_dir: Path) -> dict[str, str]:
    return {
        # A clean environment: REDIS_URL & co. from the caller's shell must not leak in.
        "PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
        "REDIS_URL": redis_url, "REDIS_PREFIX": "bench", "GPU_BACKEND": "none",
        "WORKER_ENGINES": "sim", "DEFAULT_ENGINE": "sim", "LOG_LEVEL": "WARNING",
        "LOG_FORMAT": "text", "WORKER_ID": "bench-worker", "STATE_DIR": str(state_dir),
        # FAST_LANE=false in the caller's shell measures the ASGI-only path (an ablation).
        "FAST_LANE": os.environ.get("FAST_LANE", "true"),
        # One router process (all servers share one core); bench.processes sets more.
        "ROUTER_PROCESSES": "1",
        # Likewise METRICS=false / ACCESS_LOG=false measure the pool without its metrics or
        # its access log (docs/observability.md's cost figures), ENGINE_SOCKETS=tcp with its
        # engines on loopback ports instead of Unix sockets (docs/performance.md).
        **{k: os.environ[k] for k in ("METRICS", "ACCESS_LOG", "ENGINE_SOCKETS")
           if k in os.environ},
    }


def start_pool(children: Children, run_dir: Path, extra_env: dict[str, str] | None = None,
               node: bool = False) -> Pool:
    """redis, manager, worker and router; with ``node``, worker and router are one process
    (services.node), its pid under both names, and every child's name starts with "node"
    (its logs apart from another pool's)."""
    tag = "node-" if node else ""
    redis_url, redis_pid = start_redis(children, run_dir / "redis", f"{tag}redis")
    env = service_env(redis_url, run_dir / "state") | (extra_env or {})
    pool = Pool(redis_url, {}, {"redis": redis_pid})
    for name in ("manager", "worker", "router"):
        port = free_port()
        env |= {f"{name.upper()}_HOST": "127.0.0.1", f"{name.upper()}_PORT": str(port)}
        pool.urls[name] = f"http://127.0.0.1:{port}"
    env["WORKER_URL"] = pool.urls["worker"]
    for module in ("manager", "node") if node else ("manager", "worker", "router"):
        child = module if module == "node" else tag + module
        proc = children.start(
            child, pinned(SERVER_CORE, [PYTHON, "-m", f"services.{module}.main"]), dict(env)
        )
        for name in ("worker", "router") if module == "node" else (module,):
            wait_http(f"{pool.urls[name]}/health", proc, children.log(child), 60)
            pool.pids[name] = proc.pid
    return pool


def register_models(pool: Pool, timeout_s: float = 60,
                    aliases: dict[str, list[str]] | None = None) -> None:
    aliases = ALIASES if aliases is None else aliases
    router = pool.urls["router"]
    # The pool reaches each engine on its Unix socket (ENGINE_SOCKETS=unix, the default); the
    # configurations that talk to the engine itself (direct, nginx, vllm-router) over TCP
    # use the loopback port the simulated engine also serves with --sim-port.
    ports = {alias: free_port() for alias in aliases}
    for alias, extra in aliases.items():
        spec = {"alias": alias, "model_name": f"sim/{alias}", "engine": "sim",
                "extra_args": [*extra, "--sim-port", str(ports[alias])]}
        httpx.post(f"{router}/admin/models/register", json=spec, timeout=10).raise_for_status()
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        pool.engines = _running_engines(router, ports)
        if set(pool.engines) == set(aliases) and all(_answers(router, a) for a in aliases):
            return
        time.sleep(0.2)
    raise SystemExit(f"models not serving after {timeout_s:.0f}s: {sorted(pool.engines)}")


def _running_engines(router: str, ports: dict[str, int]) -> dict[str, Engine]:
    """alias -> its engine's loopback URL and pid, from the pool's own status."""
    status = httpx.get(f"{router}/admin/status", timeout=10).json()
    out = {}
    for model in status["models"]:
        for inst in model["instances"]:
            if inst.get("state") == "RUNNING" and int(inst.get("pid", 0)):
                port = ports[model["alias"]] if inst.get("socket") else int(inst["port"])
                out[model["alias"]] = Engine(model["alias"], f"http://127.0.0.1:{port}",
                                             int(inst["pid"]))
    return out


def _answers(base: str, alias: str) -> bool:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    try:
        return httpx.post(f"{base}/v1/chat/completions", json=body, timeout=10).is_success
    except httpx.HTTPError:
        return False
