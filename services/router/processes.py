"""A router on every core: ROUTER_PROCESSES=N router processes behind one port.

The parent (:func:`supervise`) serves no request. It binds N listening sockets on the router's
address, each with SO_REUSEPORT, so the kernel spreads new connections over them by a hash of
the connection's addresses (no shared accept queue: no thundering herd, no process taking
more than its share because it woke first). Child ``i`` gets socket ``i`` as an inherited
descriptor and serves it with uvicorn. The parent keeps its own copy of every socket, so a
child that crashes leaves its socket open: the connections the kernel hashes to it wait in its
backlog until the restarted child accepts them, instead of being refused or reset. A bind
error (port taken) shows once, in the parent, before any child starts.

Children are started without a shell, each the leader of its own process group, with
PR_SET_PDEATHSIG (shared.procs): a parent killed with SIGKILL takes them with it; they also
check every second that their parent is still the one that started them (where setpriv is
missing) and drain when it is not. SIGTERM or SIGINT to the parent is forwarded to every
child, which drains as a single router does (uvicorn's graceful shutdown); the parent exits
once they are gone. A child that exits on its own is started again after a back-off.

Each child is a router of its own (own caches, own ROUTER_ID ``<id>-<i>``, own check-in), so
everything that counts routers counts processes (docs/performance.md says what is per
process). ``/metrics`` of any child sums every child's (:mod:`services.router.siblings`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType

from prometheus_client import CollectorRegistry

from services.router import siblings
from shared import private_dirs, procs
from shared.service import background
from shared.settings import RouterSettings

logger = logging.getLogger(__name__)

# Set by the parent in each child's environment: "index:count:fd:parent pid:sibling dir".
CHILD_ENV = "SVLLM_ROUTER_CHILD"
_BACKLOG = 2048  # uvicorn's default
_RESTART_MIN_S = 0.5
_RESTART_MAX_S = 30.0
_HEALTHY_S = 30.0  # a child up this long restarts at the shortest back-off again
_STOP_GRACE_S = 30.0  # uvicorn drains for 5 s; lifespan shutdown flushes limits and logs


def usable_cores(cpu_max: Path = Path("/sys/fs/cgroup/cpu.max")) -> int:
    """The cores this process may run on, capped by its cgroup's CPU quota (a container
    limited to 2 CPUs on a 64-core node gets 2, not 64)."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        quota, period = cpu_max.read_text().split()[:2]
        if quota != "max":
            cores = min(cores, max(1, math.ceil(int(quota) / int(period))))
    except (OSError, ValueError):
        pass  # no cgroup v2 quota: the affinity mask says it all
    return cores


def process_count(settings: RouterSettings) -> int:
    """ROUTER_PROCESSES, with 0 meaning one per usable core."""
    return settings.router_processes or usable_cores()


@dataclass(frozen=True)
class Child:
    """What a child router knows of its place among its siblings."""

    index: int
    count: int  # of processes under the supervisor
    fd: int
    sibling_dir: Path
    parent_pid: int

    @classmethod
    def from_env(cls) -> Child | None:
        raw = os.environ.get(CHILD_ENV)
        if not raw:
            return None
        index, count, fd, parent, path = raw.split(":", 4)
        return cls(int(index), int(count), int(fd), Path(path), int(parent))

    def socket(self) -> socket.socket:
        return socket.socket(fileno=self.fd)

    async def watch_parent(self) -> None:
        """Drain (SIGTERM to itself) once the parent is gone: the safety net where
        PR_SET_PDEATHSIG is not available."""
        while os.getppid() == self.parent_pid:
            await asyncio.sleep(1.0)
        logger.warning("router supervisor %d is gone: draining", self.parent_pid)
        os.kill(os.getpid(), signal.SIGTERM)


@contextlib.asynccontextmanager
async def running_as(child: Child | None, registry: CollectorRegistry | None
                     ) -> AsyncIterator[None]:
    """A child's own background work for the duration of the block: the parent watch, and
    (with metrics on) the socket its siblings read its metrics from. Nothing for a router
    that runs alone."""
    async with contextlib.AsyncExitStack() as stack:
        if child is not None:
            await stack.enter_async_context(background(child.watch_parent()))
            if registry is not None:
                await stack.enter_async_context(
                    siblings.exporting(registry, child.sibling_dir, child.index))
        yield


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket with SO_REUSEPORT, so several can share ``host``:``port``."""
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    try:
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        sock.bind((host, port))
        sock.listen(_BACKLOG)
    except BaseException:
        sock.close()
        raise
    return sock


_DIR_PREFIX = "svllm-router-"


def sibling_root(tmpdir: str | None = None) -> Path:
    """Where the sibling directory goes (shared.private_dirs.short_root)."""
    return private_dirs.short_root(_DIR_PREFIX, tmpdir)


def _remove_stale_dirs(root: Path | None = None) -> None:
    """Remove sibling directories left by supervisors that died without cleaning up (SIGKILL):
    those of this user whose supervisor no longer holds them (shared.private_dirs)."""
    private_dirs.remove_stale(_DIR_PREFIX, root or sibling_root())


@dataclass
class _Slot:
    index: int
    sock: socket.socket
    proc: subprocess.Popen[bytes] | None = None
    started: float = 0.0
    backoff_s: float = _RESTART_MIN_S
    restart_at: float | None = None


class Supervisor:
    def __init__(self, settings: RouterSettings, n: int) -> None:
        self.settings = settings
        self.slots = [_Slot(i, listen(settings.router_host, settings.router_port))
                      for i in range(n)]
        _remove_stale_dirs()
        # Mode 0700; held by a lock while this supervisor runs, so a later one can tell it is
        # stale.
        self.sibling_dir = private_dirs.make(_DIR_PREFIX, sibling_root())
        self.stopping = False

    def _start(self, slot: _Slot) -> None:
        fd = slot.sock.fileno()
        env = dict(os.environ)
        env[CHILD_ENV] = (f"{slot.index}:{len(self.slots)}:{fd}:{os.getpid()}:"
                          f"{self.sibling_dir}")
        # Stable across restarts of the child, so a restart is not counted as another router.
        env["ROUTER_ID"] = f"{self.settings.router_id}-{slot.index}"
        slot.proc = procs.spawn([sys.executable, "-m", "services.router.main"], env=env,
                                die_with_parent=True, pass_fds=(fd,), inherit_output=True)
        slot.started = time.monotonic()
        slot.restart_at = None
        logger.info("router process %d started (pid %d)", slot.index, slot.proc.pid)

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self.stopping = True

    def run(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            for slot in self.slots:
                self._start(slot)
            while not self.stopping:
                self._tend()
                time.sleep(0.1)
        finally:
            self._stop_all()
        return 0

    def _tend(self) -> None:
        now = time.monotonic()
        for slot in self.slots:
            if slot.proc is not None and slot.proc.poll() is not None:
                up = now - slot.started
                if up >= _HEALTHY_S:
                    slot.backoff_s = _RESTART_MIN_S
                logger.warning("router process %d (pid %d) exited with %s after %.1fs; "
                               "restarting in %.1fs", slot.index, slot.proc.pid,
                               slot.proc.returncode, up, slot.backoff_s)
                slot.proc = None
                slot.restart_at = now + slot.backoff_s
                slot.backoff_s = min(_RESTART_MAX_S, slot.backoff_s * 2)
            if slot.proc is None and slot.restart_at is not None and now >= slot.restart_at:
                self._start(slot)

    def _stop_all(self) -> None:
        """Forward SIGTERM (each drains), wait, SIGKILL what is left, reap every one."""
        running = [s.proc for s in self.slots if s.proc is not None]
        for p in running:
            procs.signal_pid(p.pid, signal.SIGTERM)
        for slot in self.slots:
            slot.sock.close()  # the children hold their own copies while they drain
        deadline = time.monotonic() + _STOP_GRACE_S
        for p in running:
            with contextlib.suppress(subprocess.TimeoutExpired):
                p.wait(timeout=max(0.0, deadline - time.monotonic()))
        for p in running:
            procs.stop(p, grace_s=1.0)  # SIGKILL to the group of any still running; reaps
        private_dirs.remove(self.sibling_dir)


def supervise(settings: RouterSettings, n: int) -> int:
    logger.info("serving %s:%d from %d router processes", settings.router_host,
                settings.router_port, n)
    return Supervisor(settings, n).run()
