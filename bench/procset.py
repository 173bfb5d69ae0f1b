"""The benchmark's child processes: pinned to a core, started and reaped through shared.procs.

Servers run on one core and load generators on the other, so a load generator never steals
CPU from what it measures and the servers' CPU use can be compared at equal footing.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from types import FrameType

import httpx

from shared import procs

ROOT = Path(__file__).resolve().parent.parent
PYTHON = sys.executable
BENCH_VENV = ROOT / ".venv-bench" / "bin"


def _cores() -> tuple[int, int]:
    """(server core, load-generator core). On a one-core machine both share core 0."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return cpus[0], cpus[0]
    return cpus[1], cpus[0]


SERVER_CORE, LOAD_CORE = _cores()


def pinned(core: int, argv: Sequence[str]) -> list[str]:
    """``argv`` run under ``taskset -c core`` (taskset execs, so the pid stays the same)."""
    taskset = shutil.which("taskset")
    if taskset is None:
        raise SystemExit("taskset not found: apt-get install util-linux")
    return [taskset, "-c", str(core), *argv]


def need(program: str, hint: str) -> str:
    found = shutil.which(program) or shutil.which(program, path=str(BENCH_VENV))
    if found is None:
        raise SystemExit(f"{program} not found: {hint}")
    return found


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Children:
    """Every process the benchmark starts; :meth:`stop_all` ends them in reverse order."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[tuple[str, subprocess.Popen[bytes]]] = []

    def log(self, name: str) -> Path:
        return self.log_dir / f"{name}.log"

    def start(
        self, name: str, argv: Sequence[str], env: Mapping[str, str] | None = None
    ) -> subprocess.Popen[bytes]:
        proc = procs.spawn(argv, log_path=self.log(name), env=env, cwd=ROOT)
        self.procs.append((name, proc))
        return proc

    def stop(self, proc: subprocess.Popen[bytes]) -> None:
        procs.stop(proc, grace_s=10)
        self.procs = [(n, p) for n, p in self.procs if p is not proc]

    def stop_all(self) -> None:
        while self.procs:
            _, proc = self.procs.pop()
            procs.stop(proc, grace_s=10)


def run_to_end(children: Children, name: str, argv: Sequence[str], timeout_s: float) -> str:
    """Run a short-lived child (a load generator) to its end; returns its output."""
    path = children.log(name)
    path.unlink(missing_ok=True)
    proc = children.start(name, argv)
    try:
        proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        raise SystemExit(f"{name} did not finish in {timeout_s:.0f}s; see {path}") from None
    finally:
        children.stop(proc)
    return path.read_text(errors="replace")


def wait_http(url: str, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"{url}: process exited ({proc.returncode}):\n{procs.tail(log)}")
        try:
            if httpx.get(url, timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise SystemExit(f"{url} not healthy after {timeout_s:.0f}s; see {log}")


def wait_tcp(port: int, proc: subprocess.Popen[bytes], log: Path, timeout_s: float) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise SystemExit(f"port {port}: process exited ({proc.returncode}):\n"
                             f"{procs.tail(log)}")
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=0.5):
                return
        except OSError:
            time.sleep(0.05)
    raise SystemExit(f"nothing listens on port {port} after {timeout_s:.0f}s; see {log}")


def _raise_interrupt(signum: int, _: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGTERM and SIGHUP behave like Ctrl-C, so every ``finally`` that reaps children runs."""
    old = {s: signal.signal(s, _raise_interrupt) for s in (signal.SIGTERM, signal.SIGHUP)}
    try:
        yield
    finally:
        for s, handler in old.items():
            signal.signal(s, handler)
