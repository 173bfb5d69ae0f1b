"""Fault-injection harness: nginx in front of routers, a steady load, and a results table."""

from __future__ import annotations

import json
import re
import shutil
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from tests.support import ROOT, Proc, free_port, wait_until

# This process's rows; tests/chaos/conftest.py passes each test's rows on as user properties
# named ROW (under pytest-xdist the table is printed by the controller, not where tests ran).
REPORT: list[dict[str, Any]] = []
ROW = "chaos_report_row"


def nginx(tmp: Path, router_ports: list[int]) -> Proc:
    """The project's deploy/nginx.conf with loopback routers, run in the foreground."""
    binary = shutil.which("nginx") or "/usr/sbin/nginx"
    conf = (ROOT / "deploy" / "nginx.conf").read_text()
    servers = "".join(f"        server 127.0.0.1:{p} max_fails=1 fail_timeout=3s;\n"
                      for p in router_ports)
    conf = re.sub(r"(        server router-\d:8000[^\n]*\n)+", servers, conf)
    port = free_port()
    conf = conf.replace("listen 80;", f"listen 127.0.0.1:{port};")
    conf = conf.replace("worker_processes auto;", "worker_processes 1;")
    (tmp / "logs").mkdir(parents=True, exist_ok=True)
    path = tmp / "nginx.conf"
    path.write_text(conf)
    argv = [binary, "-p", str(tmp), "-c", str(path),
            "-g", f"daemon off; pid {tmp}/nginx.pid; error_log {tmp}/logs/error.log warn;"]
    proc = Proc("nginx", argv, {}, tmp / "nginx.out", url="")
    proc.start()
    proc.url = f"http://127.0.0.1:{port}"
    wait_until(lambda: httpx.get(f"{proc.url}/health", timeout=1).status_code == 200, 10,
               what="nginx")
    return proc


@dataclass
class Outcome:
    kind: str
    start: float
    end: float
    result: str


def stream_result(resp: httpx.Response) -> str:
    if resp.status_code != 200:
        return f"http_{resp.status_code}"
    roles, done, error = 0, False, False
    for line in resp.iter_lines():
        if not line.startswith("data: "):
            continue
        if line == "data: [DONE]":
            done = True
            continue
        event = json.loads(line[6:])
        if "error" in event:
            error = True
        elif event.get("choices") and event["choices"][0]["delta"].get("role"):
            roles += 1
    if roles > 1:
        return "glued"  # a retry's output appended to a partial answer: must never happen
    if error:
        return "error_event"
    return "ok" if done else "truncated"


@dataclass
class Load:
    """A steady, bounded load of plain and streamed chat completions."""

    url: str
    alias: str
    plain_threads: int = 2
    stream_threads: int = 2
    max_tokens: int = 8
    outcomes: list[Outcome] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _threads: list[threading.Thread] = field(default_factory=list)

    def _body(self, stream: bool) -> dict[str, Any]:
        return {"model": self.alias, "stream": stream, "max_tokens": self.max_tokens,
                "messages": [{"role": "user", "content": "chaos"}]}

    def _one(self, client: httpx.Client, stream: bool) -> str:
        try:
            if stream:
                with client.stream("POST", f"{self.url}/v1/chat/completions",
                                   json=self._body(True)) as resp:
                    return stream_result(resp)
            r = client.post(f"{self.url}/v1/chat/completions", json=self._body(False))
            return "ok" if r.status_code == 200 else f"http_{r.status_code}"
        except httpx.HTTPError as e:
            return f"conn_{type(e).__name__}"

    def _run(self, stream: bool) -> None:
        deadline = time.monotonic() + 120  # bounded whatever happens to the test
        with httpx.Client(timeout=30) as client:
            while not self._stop.is_set() and time.monotonic() < deadline:
                t0 = time.monotonic()
                result = self._one(client, stream)
                self.outcomes.append(Outcome("stream" if stream else "plain", t0,
                                             time.monotonic(), result))

    def start(self) -> Load:
        for stream, n in ((False, self.plain_threads), (True, self.stream_threads)):
            for _ in range(n):
                t = threading.Thread(target=self._run, args=(stream,), daemon=True)
                t.start()
                self._threads.append(t)
        return self

    def stop(self) -> list[Outcome]:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=60)
        return self.outcomes

    def until(self, more: int, timeout: float = 30.0) -> None:
        """Wait until the load has completed ``more`` requests than it had so far."""
        target = len(self.outcomes) + more
        wait_until(lambda: len(self.outcomes) >= target, timeout,
                   what=f"{more} more requests under load")

    def after(self, t: float, kind: str | None = None) -> list[Outcome]:
        return [o for o in self.outcomes if o.start >= t and (kind is None or o.kind == kind)]


def report(fault: str, outcomes: list[Outcome], recover_s: float | None, note: str = "",
           sent: int | None = None) -> None:
    by = Counter(o.result for o in outcomes)
    REPORT.append({
        "fault": fault,
        "sent": len(outcomes) if sent is None else sent,
        "succeeded": by.pop("ok", 0),
        "failed": dict(sorted(by.items())),
        "recover_s": None if recover_s is None else round(recover_s, 2),
        "note": note,
    })


def table(rows: list[dict[str, Any]]) -> str:
    lines = ["| fault | sent | succeeded | failed (by outcome) | time to recover (s) | note |",
             "|---|---|---|---|---|---|"]
    for r in rows:
        failed = ", ".join(f"{k}: {v}" for k, v in r["failed"].items()) or "none"
        rec = "-" if r["recover_s"] is None else r["recover_s"]
        lines.append(f"| {r['fault']} | {r['sent']} | {r['succeeded']} | {failed} | {rec} | "
                     f"{r['note']} |")
    return "\n".join(lines)
