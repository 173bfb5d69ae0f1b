"""What the numbers were measured on: CPU, memory, kernel and the versions of the tools."""

from __future__ import annotations

import os
import platform
import re
import subprocess
import time
from pathlib import Path

from bench.procset import LOAD_CORE, ROOT, SERVER_CORE, need


def _cpu_model() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _mem_gb() -> float:
    for line in Path("/proc/meminfo").read_text().splitlines():
        if line.startswith("MemTotal:"):
            return int(line.split()[1]) / 2**20
    return 0.0


def _version(argv: list[str], pattern: str) -> str:
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=20, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    found = re.search(pattern, out.stdout + out.stderr)
    return found.group(1) if found else "?"


def _tree() -> str:
    """The commit measured, and whether the services' code differed from it."""
    git = ["git", "-C", str(ROOT)]
    head = _version([*git, "rev-parse", "--short", "HEAD"], r"(\w+)")
    dirty = subprocess.run([*git, "status", "--porcelain", "--", "services", "shared"],
                           capture_output=True, text=True, check=False).stdout.strip()
    return head + (" with uncommitted changes in services/shared" if dirty else "")


def describe() -> dict[str, str]:
    pip = str(Path(need("vllm-router", "see bench/README.md")).parent / "pip")
    return {
        "date": time.strftime("%Y-%m-%d %H:%M %Z"),
        "code": _tree(),
        "cpu": f"{_cpu_model()}, {os.cpu_count()} vCPUs",
        "memory": f"{_mem_gb():.0f} GB",
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cores": f"servers on core {SERVER_CORE}, load generators on core {LOAD_CORE}",
        "wrk": _version([need("wrk", "apt-get install wrk"), "-v"], r"wrk (\S+)"),
        "nginx": _version([need("nginx", "apt-get install nginx-light"), "-v"],
                          r"nginx/(\S+)"),
        "redis": _version([need("redis-server", "apt-get install redis-server"), "--version"],
                          r"v=(\S+)"),
        "vllm-router": _version([pip, "show", "vllm-router"], r"Version: (\S+)"),
    }


def as_markdown(machine: dict[str, str]) -> str:
    return "; ".join(f"{k}: {v}" for k, v in machine.items())
