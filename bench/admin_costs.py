"""Control-plane costs that used to grow with the pool (issue 11), against a real
redis-server and a real router process:

- ``register``/``delete``: 1,000 registrations, then 1,000 deletions, one after another
  through the admin API (each used to reload the whole model table: 43 s and 77 s);
- ``admin_models``: ``GET /admin/models`` with 5,000 models (about five sequential round
  trips per model before);
- ``held``: Redis commands per second while 10, then 1,000, requests are held for one cold
  model (each request polled Redis on its own);
- ``miss``: requests for unknown models while Redis hangs (SIGSTOP): each used to trigger a
  refresh that waited out the Redis timeout.

``--code DIR`` runs the services from another checkout (e.g. ``git archive`` of an older
commit) to measure before and after with the same harness:

    python -m bench.admin_costs [--code DIR] [--cases register,delete,admin_models,held,miss]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.procset import free_port, need, wait_http, wait_tcp
from shared import procs
from shared.keys import Keys
from shared.models import ModelSpec
from shared.store import Store, connect

ROOT = Path(__file__).resolve().parent.parent
PREFIX = "costs"


class Services:
    """redis-server and one router (no manager, no worker: nothing gets placed)."""

    def __init__(self, code: Path, run: Path) -> None:
        self.code, self.run = code, run
        self.children: list[Any] = []
        port = free_port()
        self.redis_url = f"redis://127.0.0.1:{port}/0"
        argv = [need("redis-server", "apt-get install redis-server"), "--port", str(port),
                "--bind", "127.0.0.1", "--save", "", "--appendonly", "no", "--dir", str(run)]
        self.redis = self._start("redis", argv, dict(os.environ))
        wait_tcp(port, self.redis, run / "redis.log", 10)
        rport = free_port()
        self.router = f"http://127.0.0.1:{rport}"
        env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": os.environ.get("HOME", "/"),
               "REDIS_URL": self.redis_url, "REDIS_PREFIX": PREFIX, "LOG_LEVEL": "WARNING",
               "LOG_FORMAT": "text", "DEFAULT_ENGINE": "sim", "ROUTER_HOST": "127.0.0.1",
               "ROUTER_PORT": str(rport), "HOLD_QUEUE_MAX": "5000", "ROUTE_REFRESH_S": "1"}
        proc = self._start("router", [sys.executable, "-m", "services.router.main"], env)
        wait_http(f"{self.router}/health", proc, run / "router.log", 60)

    def _start(self, name: str, argv: list[str], env: dict[str, str]) -> Any:
        proc = procs.spawn(argv, log_path=self.run / f"{name}.log", env=env, cwd=self.code)
        self.children.append(proc)
        return proc

    def stop(self) -> None:
        for proc in reversed(self.children):
            procs.stop(proc, grace_s=10)

    def commands(self) -> int:
        r = redis.Redis.from_url(self.redis_url)
        try:
            return int(r.info("stats")["total_commands_processed"])
        finally:
            r.close()


def _spec(alias: str, **kw: Any) -> dict[str, Any]:
    return {"alias": alias, "model_name": f"org/{alias}", "engine": "sim"} | kw


def register_then_delete(s: Services, n: int) -> dict[str, float]:
    with httpx.Client(base_url=s.router, timeout=30) as c:
        t0 = time.perf_counter()
        for i in range(n):
            c.post("/admin/models/register", json=_spec(f"reg-{i:05d}")).raise_for_status()
        registered = time.perf_counter() - t0
        t0 = time.perf_counter()
        for i in range(n):
            c.delete(f"/admin/models/reg-{i:05d}").raise_for_status()
        deleted = time.perf_counter() - t0
    return {f"register_{n}_s": round(registered, 2), f"delete_{n}_s": round(deleted, 2)}


async def _populate(redis_url: str, n: int) -> None:
    store = Store(connect(redis_url), Keys(PREFIX), events=False)
    try:
        for lo in range(0, n, 100):
            await asyncio.gather(*(store.register_model(ModelSpec(
                alias=f"many-{i:05d}", model_name="org/m", engine="sim", min_replicas=0))
                for i in range(lo, min(n, lo + 100))))
            await asyncio.gather(*(store.put_instance(f"many-{i:05d}", "w1", {
                "state": "SLEEPING", "inflight": "0", "port": "8000"})
                for i in range(lo, min(n, lo + 100))))
    finally:
        await store.close()


def admin_models(s: Services, n: int) -> dict[str, float]:
    asyncio.run(_populate(s.redis_url, n))
    times = []
    with httpx.Client(base_url=s.router, timeout=120) as c:
        for _ in range(3):
            t0 = time.perf_counter()
            r = c.get("/admin/models")
            r.raise_for_status()
            times.append(time.perf_counter() - t0)
        assert len(r.json()["models"]) >= n
    return {f"admin_models_{n}_s": round(statistics.median(times), 3)}


async def _hold(s: Services, n: int, alias: str, seconds: float) -> float:
    body = {"model": alias, "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
    limits = httpx.Limits(max_connections=n + 10, max_keepalive_connections=n + 10)
    async with httpx.AsyncClient(base_url=s.router, timeout=seconds + 60, limits=limits) as c:
        tasks = [asyncio.create_task(c.post("/v1/chat/completions", json=body))
                 for _ in range(n)]
        # Admission costs once per request; the steady state is what grows with holding.
        r = redis.Redis.from_url(s.redis_url, decode_responses=True)
        deadline = time.monotonic() + 120
        while r.zcard(Keys(PREFIX).queue(alias)) < n and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)
        before, t0 = s.commands(), time.monotonic()
        await asyncio.sleep(seconds)
        rate = (s.commands() - before) / (time.monotonic() - t0)
        r.close()
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    return rate


def held(s: Services, counts: tuple[int, ...] = (10, 1000)) -> dict[str, float]:
    out = {}
    with httpx.Client(base_url=s.router, timeout=30) as c:
        for n in counts:
            alias = f"cold-{n}"
            c.post("/admin/models/register", json=_spec(alias, min_replicas=0,
                                                         cold_start_timeout_s=600))
            out[f"held_{n}_commands_per_s"] = round(asyncio.run(_hold(s, n, alias, 6.0)), 1)
            time.sleep(2.0)  # the cancelled requests leave
    return out


def miss(s: Services, n: int = 5) -> dict[str, float]:
    """Requests for unknown models while Redis hangs; the router's timer has already seen
    Redis fail (SIGSTOP, then one refresh period and the Redis timeouts)."""
    os.kill(s.redis.pid, signal.SIGSTOP)
    try:
        time.sleep(20.0)
        times = []
        with httpx.Client(base_url=s.router, timeout=120) as c:
            for i in range(n):
                t0 = time.perf_counter()
                r = c.post("/v1/chat/completions", json={
                    "model": f"unknown-{i}", "messages": [{"role": "user", "content": "hi"}]})
                times.append(time.perf_counter() - t0)
                assert r.status_code == 404, r.text
    finally:
        os.kill(s.redis.pid, signal.SIGCONT)
    return {f"miss_{n}_while_redis_hangs_total_s": round(sum(times), 2),
            "miss_max_s": round(max(times), 2)}


@contextmanager
def services(code: Path) -> Iterator[Services]:
    run = Path(tempfile.mkdtemp(prefix="svllm-costs-"))
    s = None
    try:
        s = Services(code, run)
        yield s
    finally:
        if s is not None:
            s.stop()
        shutil.rmtree(run, ignore_errors=True)


CASES = ("register", "admin_models", "held", "miss")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--code", type=Path, default=ROOT)
    ap.add_argument("--cases", default=",".join(CASES))
    ap.add_argument("--n", type=int, default=1000, help="registrations and deletions")
    ap.add_argument("--models", type=int, default=5000, help="models for /admin/models")
    args = ap.parse_args()
    results: dict[str, float] = {}
    for case in args.cases.split(","):
        with services(args.code.resolve()) as s:  # a fresh pool per case
            if case == "register":
                results |= register_then_delete(s, args.n)
            elif case == "admin_models":
                results |= admin_models(s, args.models)
            elif case == "held":
                results |= held(s)
            elif case == "miss":
                results |= miss(s)
        print(json.dumps(results), flush=True)


if __name__ == "__main__":
    main()
