"""The keeper: one tiny process per engine that owns the engine's whole process tree.

The worker starts ``python -I keeper.py --fd N --grace G --orphan-grace O -- ENGINE ARGV``;
the keeper starts the engine in a process group of its own and then waits on three things:

- the socket ``N`` to the worker: ``stop`` ends the engine with grace ``G``; end-of-file means
  the worker is gone (``kill -9`` included: the kernel closes its end), and the engine is
  ended with grace ``O``. The worker does not have to be alive for its engines to go.
- the engine leaving: what it left behind in its group is ended too.
- SIGTERM/SIGINT to the keeper itself: like ``stop``.

"Ended" means SIGTERM to the engine's process group and to every other descendant, SIGKILL
after the grace, until none is left. The keeper is a child subreaper (PR_SET_CHILD_SUBREAPER),
so a descendant that leaves the group (setsid) or loses its parent is re-parented to the keeper
instead of init, and is found and ended as well: vLLM's EngineCore and Worker processes, which
rename themselves and ignore their parent's death, cannot outlive the keeper.

The keeper reports ``{"event": "started", "pid", "pgid", "start"}`` (one JSON line) on the
socket once the engine runs, ``{"event": "exited", "code"}`` as soon as the engine leader exits
on its own, and exits with the engine's exit code (128 + signal number when a signal ended it)
once nothing of the engine is left. Standard library only, so it starts fast and from any directory.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import json
import os
import select
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path

_PR_SET_CHILD_SUBREAPER = 36


def log(message: str) -> None:
    # The keeper shares the engine's log file: say who speaks.
    print(f"[svllm keeper {os.getpid()}] {message}", file=sys.stderr, flush=True)


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return int(stat.rsplit(")", 1)[1].split()[19])


def _become_subreaper() -> None:
    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.prctl(_PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) != 0:
            log("could not become a child subreaper; descendants that leave the engine's "
                "process group may outlive it")


class Keeper:
    def __init__(self, sock: socket.socket, argv: Sequence[str]) -> None:
        self.sock = sock
        self.me = os.getpid()
        self.engine = subprocess.Popen(list(argv), stdin=subprocess.DEVNULL,
                                       start_new_session=True)
        self.pgid = self.engine.pid
        self.code: int | None = None
        self.stop_requested = False

    def report_started(self) -> None:
        self.send({"event": "started", "pid": self.engine.pid, "pgid": self.pgid,
                   "start": proc_start(self.engine.pid) or 0})

    def send(self, msg: dict[str, int | str]) -> None:
        with contextlib.suppress(OSError):
            self.sock.sendall(json.dumps(msg).encode() + b"\n")

    # --------------------------------------------------------------- children and the group
    def reap(self) -> None:
        """Collect every child that exited (re-parented orphans included)."""
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return
            if pid == 0:
                return
            if pid == self.engine.pid and self.code is None:
                self.code = os.waitstatus_to_exitcode(status)
                self.engine.returncode = self.code  # Popen must not wait for it again

    def _members(self) -> list[int]:
        """Pids in the engine's group or re-parented to the keeper, still running."""
        out = []
        for entry in Path("/proc").iterdir():
            if not entry.name.isdigit() or int(entry.name) == self.me:
                continue
            try:
                fields = (entry / "stat").read_text().rsplit(")", 1)[1].split()
            except OSError:
                continue
            state, ppid, pgid = fields[0], int(fields[1]), int(fields[2])
            if state != "Z" and (pgid == self.pgid or ppid == self.me):
                out.append(int(entry.name))
        return out

    def _signal_all(self, sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pgid, sig)
        for pid in self._members():
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.kill(pid, sig)

    def _wait_empty(self, seconds: float) -> bool:
        deadline = time.monotonic() + seconds
        while True:
            self.reap()
            if not self._members():
                return True
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.05)

    def end_tree(self, grace_s: float) -> None:
        """SIGTERM everything of the engine, SIGKILL what is left after ``grace_s``."""
        self.reap()
        if not self._members():
            return
        self._signal_all(signal.SIGTERM)
        if self._wait_empty(grace_s):
            return
        log(f"engine processes still alive after {grace_s:g}s: SIGKILL")
        for _ in range(100):  # a fork bomb cannot keep us here forever
            self._signal_all(signal.SIGKILL)
            if self._wait_empty(0.5):
                return
        log("giving up: engine processes survive SIGKILL")

    # --------------------------------------------------------------- the loop
    def run(self, grace_s: float, orphan_grace_s: float) -> int:
        wake_r, wake_w = os.pipe()
        os.set_blocking(wake_w, False)
        os.set_blocking(wake_r, False)
        signal.set_wakeup_fd(wake_w)
        signal.signal(signal.SIGCHLD, lambda *_: None)
        signal.signal(signal.SIGTERM, self._on_stop_signal)
        signal.signal(signal.SIGINT, self._on_stop_signal)
        self.report_started()
        grace = self._watch(wake_r, grace_s, orphan_grace_s)
        self.end_tree(grace)
        self.reap()
        if self.code is None:  # ended by us: the group is gone, so is the leader
            self.code = self.engine.wait()
        return _exit_status(self.code)

    def _on_stop_signal(self, *_: object) -> None:
        self.stop_requested = True

    def _watch(self, wake_r: int, grace_s: float, orphan_grace_s: float) -> float:
        """Wait until the engine leaves, the worker asks or goes; the grace to apply."""
        while True:
            self.reap()
            if self.code is not None:
                # Tell the worker at once: it withdraws the route before the leftovers are
                # ended (which may take the grace).
                self.send({"event": "exited", "code": _exit_status(self.code)})
                log(f"engine exited with code {self.code}; ending what it left behind")
                return grace_s
            if self.stop_requested:
                return grace_s
            sock_fd = self.sock.fileno()
            ready, _, _ = select.select([sock_fd, wake_r], [], [], 5.0)
            if wake_r in ready:
                with contextlib.suppress(BlockingIOError):
                    os.read(wake_r, 4096)
            if sock_fd in ready:
                try:
                    data = self.sock.recv(4096)
                except OSError:
                    data = b""
                if not data:
                    log("the worker is gone: ending the engine")
                    return orphan_grace_s
                if b"stop" in data:
                    return grace_s


def _exit_status(code: int) -> int:
    """A Popen return code as an exit status: 128 + N for a process ended by signal N."""
    return code if code >= 0 else 128 - code


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="keeper", allow_abbrev=False)
    parser.add_argument("--fd", type=int, required=True)
    parser.add_argument("--grace", type=float, default=15.0)
    parser.add_argument("--orphan-grace", type=float, default=5.0)
    parser.add_argument("argv", nargs=argparse.REMAINDER)
    ns = parser.parse_args(argv)
    engine_argv = ns.argv[1:] if ns.argv[:1] == ["--"] else ns.argv
    if not engine_argv:
        parser.error("no engine command given")
    sock = socket.socket(fileno=ns.fd)
    _become_subreaper()
    try:
        keeper = Keeper(sock, engine_argv)
    except OSError as e:
        log(f"cannot start the engine {engine_argv[0]!r}: {e}")
        return 127
    return keeper.run(ns.grace, ns.orphan_grace)


if __name__ == "__main__":
    sys.exit(main())
