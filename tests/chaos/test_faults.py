"""Fault injection under a steady load of plain and streamed requests through nginx.

Each test builds its own pool (real redis-server, nginx, service processes, simulated
engines), injects one fault, checks what the issue promises, and adds a row to the table
printed at the end of the run (also written to .run/chaos-report.md).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from pathlib import Path

import httpx
import pytest
import redis

from tests.chaos.harness import Load, nginx, report
from tests.support import (
    Cluster,
    Proc,
    RedisServer,
    engine_address,
    engine_call,
    free_port,
    register,
    running_on,
    status,
    stays,
    wait_serving,
    wait_until,
)

# Fault injection measures recovery under load: the chaos tests run one at a time, on one
# pytest-xdist worker (tests on the other workers still load the machine).
pytestmark = [pytest.mark.chaos, pytest.mark.xdist_group("chaos")]
MODEL = ["--itl", "0.01"]


def pool(cluster: Cluster, tmp: Path, workers: int = 3, routers: int = 2,
         managers: int = 1) -> tuple[list[Proc], list[Proc], Proc]:
    for i in range(managers):
        cluster.manager(f"mgr{i + 1}")
    ws = [cluster.worker(f"w{i + 1}") for i in range(workers)]
    rs = [cluster.router(f"router{i + 1}") for i in range(routers)]
    front = nginx(tmp / "nginx", [int(r.url.rsplit(":", 1)[1]) for r in rs])
    cluster.procs.append(front)
    assert register(rs[0], "m", engine="sim", replicas=2, extra_args=MODEL).status_code == 201
    wait_until(lambda: len(running_on(rs[0], "m")) == 2, 30, what="two replicas")
    wait_serving(rs[0], "m")
    wait_serving(rs[1] if len(rs) > 1 else rs[0], "m")
    return ws, rs, front


def by_id(procs: list[Proc], name: str) -> Proc:
    return next(p for p in procs if p.name == name)


def test_kill9_worker_holding_a_replica(cluster: Cluster, tmp_path: Path) -> None:
    ws, rs, front = pool(cluster, tmp_path)
    load = Load(front.url, "m").start()
    load.until(20)
    victim = by_id(ws, running_on(rs[0], "m")[0])
    t0 = time.monotonic()
    victim.kill9()
    wait_until(lambda: len(running_on(rs[0], "m")) == 2 and victim.name not in
               running_on(rs[0], "m"), 30, what="replica re-placed")
    recovered = time.monotonic() - t0
    load.until(20)
    outcomes = load.stop()
    report("kill -9 of a worker holding one of two replicas", outcomes, recovered,
           "recovery: second replica running on the spare worker")
    plain = [o.result for o in outcomes if o.kind == "plain"]
    streams = [o.result for o in outcomes if o.kind == "stream"]
    assert set(plain) == {"ok"}, "a non-streamed request failed despite the retry"
    assert set(streams) <= {"ok", "error_event"}, "a stream was glued or cut silently"


def test_sigstop_worker_past_ttl_then_sigcont(cluster: Cluster, tmp_path: Path) -> None:
    ws, rs, front = pool(cluster, tmp_path)
    load = Load(front.url, "m").start()
    load.until(20)
    victim = by_id(ws, running_on(rs[0], "m")[0])
    assert victim.popen is not None
    t0 = time.monotonic()
    os.kill(victim.popen.pid, signal.SIGSTOP)
    try:
        wait_until(lambda: victim.name not in running_on(rs[0], "m")
                   and len(running_on(rs[0], "m")) == 2, 30, what="routes moved off")
        removed = time.monotonic() - t0
    finally:
        os.kill(victim.popen.pid, signal.SIGCONT)
    # No flapping: once the stopped worker is back, the routes must not swing back to it.
    seen = set()

    def record_routes() -> bool:
        seen.add(tuple(sorted(running_on(rs[0], "m"))))
        return True

    stays(record_routes, 3.0, interval=0.1)
    wait_until(lambda: any(w["worker_id"] == victim.name and w["alive"]
                           for w in status(rs[0])["workers"]), 10, what="worker back")
    outcomes = load.stop()
    report("SIGSTOP of a worker past its TTL, then SIGCONT", outcomes, removed,
           f"recovery: routes moved off the stopped worker; route sets after SIGCONT: {len(seen)}")
    assert len(seen) == 1, f"routes flapped after SIGCONT: {seen}"
    assert set(o.result for o in outcomes if o.kind == "plain") == {"ok"}


def test_kill9_leader_manager(cluster: Cluster, tmp_path: Path) -> None:
    _ws, rs, front = pool(cluster, tmp_path, workers=2, managers=2)
    managers = [p for p in cluster.procs if p.name.startswith("mgr")]
    leader = next(m for m in managers if httpx.get(f"{m.url}/health").json()["leader"])
    standby = next(m for m in managers if m is not leader)
    load = Load(front.url, "m").start()
    load.until(10)
    t0 = time.monotonic()
    leader.kill9()
    wait_until(lambda: httpx.get(f"{standby.url}/health").json()["leader"], 10,
               what="standby leads")
    took = time.monotonic() - t0
    assert register(rs[0], "after", engine="sim").status_code == 201
    wait_serving(rs[0], "after", 20)
    outcomes = load.stop()
    report("kill -9 of the leader manager", outcomes, took,
           "recovery: standby holds the lease (LEASE_TTL_S=1.5) and places a new model")
    assert took < 1.5 + 2.0
    assert set(o.result for o in outcomes) == {"ok"}


def test_kill9_router_behind_nginx(cluster: Cluster, tmp_path: Path) -> None:
    _ws, rs, front = pool(cluster, tmp_path)
    load = Load(front.url, "m", plain_threads=3, stream_threads=3, max_tokens=30).start()
    load.until(20)
    t0 = time.monotonic()
    rs[0].kill9()
    t1 = time.monotonic()  # reaped: from here on the router is gone, not dying
    load.until(30)
    outcomes = load.stop()
    failed = [o for o in outcomes if o.result != "ok"]
    # Only requests in flight on the killed router while it died may fail.
    in_flight = [o for o in failed if o.start <= t1 + 0.05 and o.end + 0.05 >= t0]
    after = [o for o in outcomes if o.start > t1 + 0.05 and o.result != "ok"]
    ok_after = [o for o in outcomes if o.start > t0 and o.result == "ok"]
    recovered = min(o.end for o in ok_after) - t0 if ok_after else None
    report("kill -9 of one router behind nginx", outcomes, recovered,
           f"failures all in flight on the killed router: {len(in_flight)} of 6 load threads")
    assert not after, f"requests sent after the kill failed: {after}"
    assert len(failed) == len(in_flight) <= 6


def test_redis_restart_loses_nothing(cluster: Cluster, tmp_path: Path) -> None:
    own = RedisServer(free_port(), tmp_path / "redis").start(appendonly=True)
    try:
        cluster.redis_url = own.url
        _ws, rs, front = pool(cluster, tmp_path)
        for alias in ("a1", "a2"):
            assert register(rs[0], alias, engine="sim").status_code == 201
        wait_until(lambda: running_on(rs[0], "a1") and running_on(rs[0], "a2"), 20,
                   what="models running")
        before = status(rs[0])
        pids = {m["alias"]: sorted(i["pid"] for i in m["instances"]) for m in before["models"]}
        load = Load(front.url, "m").start()
        load.until(10)
        own.stop()  # graceful: the append-only file is flushed
        down_at, served = time.monotonic(), len(load.outcomes)
        # Down longer than the heartbeat TTL (1.5 s), serving all the while from caches.
        wait_until(lambda: time.monotonic() - down_at >= 2.5
                   and len(load.outcomes) >= served + 10, 30, what="served while Redis down")
        t0 = time.monotonic()
        own.start(appendonly=True)
        wait_until(lambda: all(len(running_on(rs[0], a)) == n for a, n in
                               (("m", 2), ("a1", 1), ("a2", 1))), 15, what="routes back")
        recovered = time.monotonic() - t0
        load.until(10)
        outcomes = load.stop()
        after = status(rs[0])
        report("Redis restart (AOF), down 2.5 s", outcomes, recovered,
               "recovery: every route back; requests served from router caches meanwhile")
        assert {m["alias"]: m["spec"] for m in after["models"]} == \
            {m["alias"]: m["spec"] for m in before["models"]}
        # Nobody was declared dead for the outage: the same engines serve.
        assert {m["alias"]: sorted(i["pid"] for i in m["instances"])
                for m in after["models"]} == pids
        assert set(o.result for o in outcomes) == {"ok"}
    finally:
        cluster.stop_all()  # before their Redis: they would spend their stop grace on it
        own.stop()


def sentinel_conf(tmp: Path, port: int, primary: int) -> Path:
    path = tmp / f"sentinel-{port}.conf"
    path.write_text(
        f"port {port}\nbind 127.0.0.1\ndir {tmp}\n"
        f"sentinel monitor mymaster 127.0.0.1 {primary} 2\n"
        "sentinel down-after-milliseconds mymaster 1000\n"
        "sentinel failover-timeout mymaster 5000\n"
        "sentinel parallel-syncs mymaster 1\n")
    return path


def keys(server: RedisServer) -> set[str]:
    r = redis.Redis(port=server.port, decode_responses=True)
    try:
        return {k for k in r.scan_iter() if ":{w:" not in k and not k.endswith(":load")}
    finally:
        r.close()


def test_redis_primary_killed_under_sentinel(cluster: Cluster, tmp_path: Path) -> None:
    # No diskless-sync delay: by default the primary waits 5 s for more replicas first.
    primary = RedisServer(free_port(), tmp_path / "primary").start(
        appendonly=True, extra=["--repl-diskless-sync-delay", "0"])
    replica = RedisServer(free_port(), tmp_path / "replica").start(
        appendonly=True, extra=["--replicaof", "127.0.0.1", str(primary.port)])
    sentinels = []
    try:
        for _ in range(3):
            port = free_port()
            conf = sentinel_conf(tmp_path, port, primary.port)
            argv = [primary.binary(), str(conf), "--sentinel"]
            sentinels.append(Proc(f"sentinel-{port}", argv, dict(os.environ),
                                  tmp_path / f"sentinel-{port}.log").start())
        addrs = ",".join(f"127.0.0.1:{s.argv[1].rsplit('-', 1)[1].split('.')[0]}"
                         for s in sentinels)
        cluster.extra_env.update(REDIS_SENTINELS=addrs, REDIS_SENTINEL_MASTER="mymaster")
        _ws, rs, front = pool(cluster, tmp_path, workers=2)
        # Asynchronous replication: fail over only once the replica has what was written.
        wait_until(lambda: keys(replica) == keys(primary), 10, what="replica in sync")
        load = Load(front.url, "m").start()
        load.until(10)
        t0 = time.monotonic()
        assert primary.proc is not None
        primary.proc.kill9()
        # The pool writes again once a replica is promoted, with no service restarted.
        wait_until(lambda: register(rs[0], "post", engine="sim").status_code == 201, 30,
                   interval=0.2, what="admin writes work after failover")
        wait_serving(rs[1], "post", 20)
        recovered = time.monotonic() - t0
        outcomes = load.stop()
        report("Redis primary killed under Sentinel", outcomes, recovered,
               "recovery: replica promoted, an admin write succeeds, a new model serves")
        assert set(o.result for o in outcomes) == {"ok"}
    finally:
        # The services first: with Redis and the sentinels gone, each would spend its whole
        # stop grace (10 s) reaching for them before being killed.
        cluster.stop_all()
        for s in sentinels:
            s.stop()
        replica.stop()
        primary.stop()


def test_thousand_client_disconnects_abort_everything(cluster: Cluster) -> None:
    cluster.manager()
    cluster.worker("w1")
    router = cluster.router()
    assert register(router, "cx", engine="sim", extra_args=["--itl", "0.02"]).status_code == 201
    wait_serving(router, "cx")
    inst = status(router)["models"][0]["instances"][0]
    engine = engine_address(inst)
    assert router.popen is not None
    pid = router.popen.pid

    def sockets() -> int:
        fds = Path(f"/proc/{pid}/fd")
        return sum(1 for f in fds.iterdir() if os.readlink(f).startswith("socket:"))

    def rss_mb() -> float:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
        return 0.0

    async def hang_up(client: httpx.AsyncClient, i: int) -> None:
        body = {"model": "cx", "stream": i % 2 == 0, "max_tokens": 200,
                "messages": [{"role": "user", "content": f"bye {i}"}]}
        if i % 2 == 0:
            async with client.stream("POST", "/v1/chat/completions", json=body) as resp:
                async for _ in resp.aiter_lines():
                    break  # first event received: hang up mid-stream
        else:
            with contextlib.suppress(httpx.TimeoutException):  # hung up before the answer
                await client.post("/v1/chat/completions", json=body, timeout=0.1)

    async def wave(n: int, start: int) -> None:
        sem = asyncio.Semaphore(25)

        async def one(i: int) -> None:
            async with sem, httpx.AsyncClient(base_url=router.url, timeout=30) as c:
                await hang_up(c, i)

        await asyncio.gather(*(one(start + i) for i in range(n)))

    warm = engine_call(engine, "GET", "/sim/stats").json()["completed"]  # warm-up and readiness

    def settled() -> bool:
        # Every generation that reached the engine was aborted; none finished. (A client
        # that hangs up before the router forwards causes no generation at all.)
        s = engine_call(engine, "GET", "/sim/stats").json()
        return bool(s["running"] == 0 and s["aborted"] + s["completed"] == s["requests"])

    asyncio.run(wave(100, 0))
    wait_until(settled, 30, what="first 100 settled")
    base_sockets, base_rss = sockets(), rss_mb()
    t0 = time.monotonic()
    asyncio.run(wave(900, 100))
    wait_until(settled, 60, what="all 1000 settled")
    took = time.monotonic() - t0
    wait_until(lambda: sockets() <= base_sockets + 2, 10, what="router sockets back to base")
    grew = rss_mb() - base_rss
    stats = engine_call(engine, "GET", "/sim/stats").json()
    report("1,000 client disconnects (half streamed); time = to settle", [], took,
           f"engine: {stats['aborted']} generations started, all aborted, none completed; "
           f"router sockets {base_sockets} -> {sockets()}; RSS +{grew:.1f} MB", sent=1000)
    assert stats["completed"] == warm
    assert stats["aborted"] >= 500  # every streamed one at least reached the engine
    assert grew < 15, f"router memory grew {grew:.1f} MB over 900 disconnects"
