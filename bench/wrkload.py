"""Plain (non-streamed) load: wrk with a Lua script, pinned to the load-generator core.

wrk is an event-loop C client: one thread drives 64 keep-alive connections at well over
100k req/s, far beyond what the servers here reach, so it never is the bottleneck.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from bench.procset import LOAD_CORE, Children, need, pinned, run_to_end

# The done() hook prints one machine-readable line; wrk's own text is for people.
_LUA = """\
wrk.method = "POST"
wrk.body = [[{body}]]
wrk.headers["Content-Type"] = "application/json"

done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    "WRKJSON {{\\"requests\\": %d, \\"duration_us\\": %d, \\"connect\\": %d, \\"read\\": %d, "
    .. "\\"write\\": %d, \\"status\\": %d, \\"timeout\\": %d, \\"p50_us\\": %d, "
    .. "\\"p90_us\\": %d, \\"p99_us\\": %d, \\"max_us\\": %d, \\"mean_us\\": %.1f}}\\n",
    summary.requests, summary.duration, e.connect, e.read, e.write, e.status, e.timeout,
    latency:percentile(50), latency:percentile(90), latency:percentile(99), latency.max,
    latency.mean))
end
"""


@dataclass(frozen=True)
class WrkResult:
    requests: int
    rps: float
    p50_ms: float
    p99_ms: float
    errors: int  # non-2xx/3xx answers plus socket errors and timeouts

    def as_dict(self) -> dict[str, float]:
        return {"requests": self.requests, "rps": self.rps, "p50_ms": self.p50_ms,
                "p99_ms": self.p99_ms, "errors": self.errors}


def write_script(path: Path, body: dict[str, object]) -> Path:
    text = json.dumps(body, separators=(",", ":"))
    if "]]" in text:
        raise ValueError("body must not contain ']]' (Lua long string)")
    path.write_text(_LUA.format(body=text))
    return path


def run_wrk(
    children: Children, url: str, script: Path, connections: int, duration_s: int
) -> WrkResult:
    binary = need("wrk", "apt-get install wrk")
    argv = [binary, "-t1", f"-c{connections}", f"-d{duration_s}s", "--timeout", "10s",
            "--latency", "-s", str(script), url]
    return parse(run_to_end(children, "wrk", pinned(LOAD_CORE, argv), duration_s + 30))


def parse(output: str) -> WrkResult:
    line = next((ln for ln in output.splitlines() if ln.startswith("WRKJSON ")), None)
    if line is None:
        raise SystemExit(f"wrk printed no result:\n{output[-2000:]}")
    d = json.loads(line.removeprefix("WRKJSON "))
    errors = d["connect"] + d["read"] + d["write"] + d["status"] + d["timeout"]
    return WrkResult(
        requests=d["requests"],
        rps=d["requests"] / (d["duration_us"] / 1e6),
        p50_ms=d["p50_us"] / 1000,
        p99_ms=d["p99_us"] / 1000,
        errors=errors,
    )
