"""API keys and limits: accuracy across routers, cost per request, revocation time.

``python -m bench.keys [--duration 15] [--cost-duration 5]`` starts its own pool (redis,
manager, worker with sim engines, four routers), then measures, and prints one JSON object:

- accuracy: 4 routers, one key at 20 req/s (rpm 1200), 64 clients spread over the routers for
  ``--duration`` s: admitted against limit x time + burst;
- cost: wrk at c=1 and c=16 on one router, a limited key (leases: LIMITS_LEASE_S default)
  against API_TOKEN (no key, no limiter), and the key on a router with LIMITS_LEASE_S=0 (one
  EVALSHA per request), interleaved in one run; req/s, p50, and the router's and Redis's
  CPU microseconds per request;
- tokens: the same 4 routers and 64 clients, one key at 1,000 tokens/s (tpm 60,000), requests
  of a known reservation: the tokens of the admitted answers (their ``usage``) against
  limit x time + one second's burst; the overshoot in reservations (at most one, docs/keys.md);
- round trips: Redis calls of the admission script (``EVALSHA``) per request served, with
  leases and without (one per request at most), counted from INFO commandstats;
- revocation: 20 keys, each revoked through one router; the time until all four refuse it.
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import sys
import tempfile
import time
from functools import partial
from pathlib import Path
from typing import Any

import httpx
import redis

from bench.docs import replace_block
from bench.pool import register_models, service_env, start_pool
from bench.procset import PYTHON, SERVER_CORE, Children, free_port, pinned, wait_http
from bench.wrkload import run_wrk, write_script

API_TOKEN = "bench-api-token"
BODY = {"model": "sim0", "messages": [{"role": "user", "content": "hi"}], "max_tokens": 1}
TPM = 60_000
TOKENS_BODY = json.dumps({"model": "sim0", "max_tokens": 20,
                          "messages": [{"role": "user", "content": "count the tokens"}]})


def add_routers(children: Children, redis_url: str, run_dir: Path, n: int, first: int = 1,
                **extra: str) -> list[str]:
    urls = []
    for i in range(first, first + n):
        port = free_port()
        env = service_env(redis_url, run_dir / "state") | {
            "ROUTER_HOST": "127.0.0.1", "ROUTER_PORT": str(port), "API_TOKEN": API_TOKEN,
            "ROUTER_ID": f"bench-router-{i}"} | extra
        proc = children.start(f"router{i}", pinned(SERVER_CORE, [
            PYTHON, "-m", "services.router.main"]), env)
        wait_http(f"http://127.0.0.1:{port}/health", proc, children.log(f"router{i}"), 60)
        urls.append(f"http://127.0.0.1:{port}")
    return urls


def pid_of(children: Children, name: str) -> int:
    return next(p.pid for n, p in children.procs if n == name)


def cpu_s(pid: int) -> float:
    """User + system CPU seconds of process ``pid`` so far (Linux /proc)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def create_key(router: str, **fields: Any) -> dict[str, Any]:
    r = httpx.post(f"{router}/admin/keys", json={"name": "bench", "tenant": "bench"} | fields,
                   timeout=10)
    r.raise_for_status()
    return dict(r.json())


async def _hammer(routers: list[str], key: str, body: str, duration_s: float,
                  clients: int) -> tuple[dict[str, int], float]:
    """``clients`` clients spread over the routers, each sending ``body`` back to back for
    ``duration_s`` with ``key``: answers by kind, the tokens of the admitted ones (their
    ``usage``), and the seconds it took."""
    counts = {"admitted": 0, "limited": 0, "other": 0, "tokens": 0}
    headers = {"authorization": f"Bearer {key}", "content-type": "application/json"}

    async def client(i: int, http: httpx.AsyncClient, until: float) -> None:
        url = f"{routers[i % len(routers)]}/v1/chat/completions"
        while time.monotonic() < until:
            r = await http.post(url, content=body, headers=headers)
            kind = {200: "admitted", 429: "limited"}.get(r.status_code, "other")
            counts[kind] += 1
            if r.status_code == 200:
                counts["tokens"] += int(r.json()["usage"]["total_tokens"])

    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(timeout=10, limits=limits) as http:
        began = time.monotonic()
        until = began + duration_s
        await asyncio.gather(*(client(i, http, until) for i in range(clients)))
        return counts, time.monotonic() - began


async def accuracy(routers: list[str], duration_s: float, clients: int = 64) -> dict[str, Any]:
    key = create_key(routers[0], rpm=1200)["key"]
    await asyncio.sleep(0.5)
    counts, elapsed = await _hammer(routers, key, json.dumps(BODY), duration_s, clients)
    del counts["tokens"]
    bound = 20 * elapsed + 20
    return counts | {"seconds": round(elapsed, 2), "bound": round(bound, 1),
                     "admitted_over_bound": round(counts["admitted"] / bound, 4)}


async def token_accuracy(routers: list[str], duration_s: float,
                         clients: int = 64) -> dict[str, Any]:
    """One key at TPM tokens a minute, 64 clients over the routers: tokens of the admitted
    answers (``usage.total_tokens``) against the bound, and the overshoot in reservations."""
    key = create_key(routers[0], tpm=TPM)["key"]
    await asyncio.sleep(0.5)
    counts, elapsed = await _hammer(routers, key, TOKENS_BODY, duration_s, clients)
    # Each admitted request was reserved its prompt estimate plus max_tokens, corrected to
    # its usage once answered (services/router/limiter.py's estimate).
    reservation = len(TOKENS_BODY) // 4 + 1 + 20
    bound = TPM / 60 * (elapsed + 1)
    return counts | {"seconds": round(elapsed, 2), "bound": round(bound), "tpm": TPM,
                     "reservation": reservation,
                     "tokens_over_bound": round(counts["tokens"] / bound, 4),
                     "overshoot_reservations": round(max(0.0, counts["tokens"] - bound)
                                                     / reservation, 2)}


def _script_calls(r: redis.Redis) -> int:
    stats = r.info("commandstats")
    return sum(int(stats.get(f"cmdstat_{c}", {}).get("calls", 0)) for c in ("evalsha", "eval"))


def cost(children: Children, routers: dict[str, tuple[str, int]], redis_pid: int,
         run_dir: Path, duration_s: int, redis_url: str) -> dict[str, Any]:
    """``routers``: "lease" (LIMITS_LEASE_S default) and "nolease" (0): URL and pid. Off is
    API_TOKEN on the lease router; on: the key there; on_nolease: the key on the other."""
    router = routers["lease"][0]
    key = create_key(router, rpm=10_000_000, tpm=10_000_000_000)["key"]
    time.sleep(0.5)
    scripts = {}
    for name, secret in (("off", API_TOKEN), ("on", key)):
        path = write_script(run_dir / f"keys-{name}.lua", BODY)
        path.write_text(path.read_text().replace(
            'wrk.headers["Content-Type"] = "application/json"',
            'wrk.headers["Content-Type"] = "application/json"\n'
            f'wrk.headers["Authorization"] = "Bearer {secret}"'))
        scripts[name] = path
    out: dict[str, Any] = {}
    runs = {"off": ("lease", "off"), "on": ("lease", "on"), "on_nolease": ("nolease", "on")}
    rconn = redis.Redis.from_url(redis_url)
    for conc in (1, 16):
        for _ in range(2):  # interleaved: off, on, on_nolease, off, on, on_nolease
            for name, (which, script) in runs.items():
                url, pid = routers[which]
                before = cpu_s(pid), cpu_s(redis_pid), _script_calls(rconn)
                r = run_wrk(children, f"{url}/v1/chat/completions", scripts[script], conc,
                            duration_s).as_dict()
                # CPU per request of the router and of Redis: steadier than req/s on a
                # shared machine.
                n = max(1, r["requests"])
                r["router_cpu_us"] = (cpu_s(pid) - before[0]) / n * 1e6
                r["redis_cpu_us"] = (cpu_s(redis_pid) - before[1]) / n * 1e6
                # Admission round trips: the limiter's script calls (nothing else in the
                # pool calls a script while wrk runs), per request served.
                r["scripts_per_request"] = (_script_calls(rconn) - before[2]) / n
                out.setdefault(f"c{conc}_{name}", []).append(r)
    rconn.close()
    summary: dict[str, Any] = {}
    for conc in (1, 16):
        off = out[f"c{conc}_off"]
        p50_off = sorted(x["p50_ms"] for x in off)[0]
        rps_off = max(x["rps"] for x in off)
        row: dict[str, Any] = {"p50_ms_off": p50_off, "rps_off": round(rps_off),
                               "router_cpu_us_off": _least(off, "router_cpu_us"),
                               "redis_cpu_us_off": _least(off, "redis_cpu_us"),
                               "scripts_per_request_off": round(
                                   max(x["scripts_per_request"] for x in off), 3)}
        for name in ("on", "on_nolease"):
            on = out[f"c{conc}_{name}"]
            p50_on = sorted(x["p50_ms"] for x in on)[0]
            rps_on = max(x["rps"] for x in on)
            sfx = name.removeprefix("on")
            row |= {f"p50_ms_on{sfx}": p50_on,
                    f"added_p50_ms{sfx}": round(p50_on - p50_off, 3),
                    f"rps_on{sfx}": round(rps_on), f"rps_ratio{sfx}": round(rps_on / rps_off, 3),
                    f"router_cpu_us_on{sfx}": _least(on, "router_cpu_us"),
                    f"redis_cpu_us_on{sfx}": _least(on, "redis_cpu_us"),
                    f"scripts_per_request_on{sfx}": round(
                        max(x["scripts_per_request"] for x in on), 3),
                    f"errors_on{sfx}": sum(x["errors"] for x in on)}
        summary[f"c{conc}"] = row
    return summary


def _least(runs: list[dict[str, Any]], field: str) -> float:
    return round(float(min(x[field] for x in runs)), 1)


def revocation(routers: list[str], rounds: int = 20) -> dict[str, Any]:
    times = []

    def refused(base: str, key: str, deadline: float) -> float:
        h = {"authorization": f"Bearer {key}"}
        with httpx.Client(timeout=5) as http:
            while time.monotonic() < deadline:
                if http.get(f"{base}/v1/models", headers=h).status_code == 401:
                    return time.monotonic()
        return float("inf")

    with concurrent.futures.ThreadPoolExecutor(len(routers)) as pool:
        for i in range(rounds):
            made = create_key(routers[i % len(routers)])
            h = {"authorization": f"Bearer {made['key']}"}
            for base in routers:
                while httpx.get(f"{base}/v1/models", headers=h, timeout=5).status_code != 200:
                    time.sleep(0.01)
            began = time.monotonic()
            httpx.delete(f"{routers[(i + 1) % len(routers)]}/admin/keys/{made['key_id']}",
                         timeout=10).raise_for_status()
            deadline = began + 5
            ends = list(pool.map(partial(refused, key=made["key"], deadline=deadline),
                                 routers))
            times.append(max(ends) - began)
    return {"rounds": rounds, "worst_s": round(max(times), 3),
            "median_s": round(sorted(times)[len(times) // 2], 3)}


def markdown(result: dict[str, Any], cmd: str) -> str:
    a, r, t = result["accuracy"], result["revocation"], result["tokens"]
    c1, c16 = result["cost"]["c1"], result["cost"]["c16"]
    return "\n".join([
        f"`{cmd}`; every server process on one core (bench/README.md).", "",
        "| figure | goal | measured |", "|---|---|---|",
        f"| accuracy: admitted / (20 req/s x {a['seconds']} s + 20), 4 routers, 64 clients "
        f"| 0.97 to 1.01 | {a['admitted_over_bound']} ({a['admitted']} admitted, "
        f"{a['limited']} refused, bound {a['bound']}) |",
        f"| tokens: admitted answers' tokens / ({t['tpm']} tpm x ({t['seconds']} s + 1 s)), "
        f"same routers and clients | <= 1 + one reservation | {t['tokens_over_bound']} "
        f"({t['tokens']} tokens in {t['admitted']} answers, bound {t['bound']}; overshoot "
        f"{t['overshoot_reservations']} reservations of {t['reservation']}) |",
        f"| Redis round trips (admission script calls) per request, c=1 / c=16: with leases "
        f"/ LIMITS_LEASE_S=0 | <= 1 | {c1['scripts_per_request_on']} / "
        f"{c16['scripts_per_request_on']}; {c1['scripts_per_request_on_nolease']} / "
        f"{c16['scripts_per_request_on_nolease']} (API_TOKEN: {c16['scripts_per_request_off']}) |",
        f"| cost: added p50 at c=1, key with limits vs API_TOKEN | <= 0.3 ms "
        f"| {c1['added_p50_ms']} ms ({c1['p50_ms_off']} -> {c1['p50_ms_on']} ms) |",
        f"| cost: req/s at c=16, on / off | >= 0.80 | {c16['rps_ratio']} "
        f"({c16['rps_off']} -> {c16['rps_on']} req/s) |",
        f"| router + Redis CPU per request at c=16: off / on / on, LIMITS_LEASE_S=0 | - "
        f"| {c16['router_cpu_us_off'] + c16['redis_cpu_us_off']:.0f} / "
        f"{c16['router_cpu_us_on'] + c16['redis_cpu_us_on']:.0f} / "
        f"{c16['router_cpu_us_on_nolease'] + c16['redis_cpu_us_on_nolease']:.0f} µs |",
        f"| req/s at c=16 with LIMITS_LEASE_S=0 (one EVALSHA per request), on / off | - "
        f"| {c16['rps_ratio_nolease']} ({c16['rps_on_nolease']} req/s) |",
        f"| revocation: worst of {r['rounds']} until every router refuses | <= 1 s "
        f"| {r['worst_s']} s (median {r['median_s']} s) |",
    ])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--duration", type=float, default=15.0, help="accuracy run (s)")
    ap.add_argument("--cost-duration", type=int, default=5, help="each wrk point (s)")
    ap.add_argument("--from-json", type=Path, default=None,
                    help="write docs/performance.md's block from an earlier result")
    args = ap.parse_args()
    if args.from_json is not None:
        result = json.loads(args.from_json.read_text())
        replace_block("keys", markdown(result, result.get("command", "python -m bench.keys")))
        return
    run_dir = Path(tempfile.mkdtemp(prefix="svllm-bench-keys-"))
    children = Children(run_dir)
    try:
        pool = start_pool(children, run_dir)
        register_models(pool)
        routers = [pool.urls["router"], *add_routers(children, pool.redis_url, run_dir, 3)]
        nolease = add_routers(children, pool.redis_url, run_dir, 1, first=4,
                              LIMITS_LEASE_S="0")[0]
        result = {"cost": cost(children, {
            "lease": (routers[1], pid_of(children, "router1")),
            "nolease": (nolease, pid_of(children, "router4"))}, pool.pids["redis"], run_dir,
            args.cost_duration, pool.redis_url),
                  "accuracy": asyncio.run(accuracy(routers, args.duration)),
                  "tokens": asyncio.run(token_accuracy(routers, args.duration)),
                  "revocation": revocation(routers)}
        result["command"] = "python -m bench.keys " + " ".join(sys.argv[1:])
        print(json.dumps(result, indent=2))
    finally:
        children.stop_all()


if __name__ == "__main__":
    main()
