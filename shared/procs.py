"""Child processes: started without a shell, in their own process group, killed as a group.

Every process the project starts (engines, and services/redis in tests and scripts) goes
through :func:`spawn` and :func:`stop`, so no code path can forget the group or the reaping.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path


def die_with_parent_prefix() -> list[str]:
    """An argv prefix that makes the kernel SIGKILL the child when its parent dies, so a
    crashed (kill -9) worker cannot leave an engine holding GPU memory.

    util-linux's setpriv sets PR_SET_PDEATHSIG and execs the command (same pid). It is used
    instead of a preexec_fn, which is unsafe in a process with threads. Empty where missing.
    """
    setpriv = shutil.which("setpriv") if sys.platform == "linux" else None
    return [setpriv, "--pdeathsig", "KILL", "--"] if setpriv else []


def spawn(
    argv: Sequence[str],
    *,
    log_path: Path | None = None,
    env: Mapping[str, str] | None = None,
    cwd: Path | None = None,
    die_with_parent: bool = False,
    pass_fds: Sequence[int] = (),
    inherit_output: bool = False,
) -> subprocess.Popen[bytes]:
    """Start ``argv`` (no shell) as the leader of a new process group.

    stdout and stderr go to ``log_path`` (appended) or are discarded. ``env`` replaces the
    environment when given. ``die_with_parent``: see :func:`die_with_parent_prefix`.
    ``pass_fds``: descriptors the child inherits (every other one is closed in it).
    ``inherit_output``: stdout and stderr are the caller's own (``log_path`` is ignored).
    """
    if not argv:
        raise ValueError("empty argument list")
    out: int | object = subprocess.DEVNULL
    handle = None
    if inherit_output:
        out = None
    elif log_path is not None:
        log_path.parent.mkdir(parents=True, exist_ok=True)
        handle = open(log_path, "ab")  # noqa: SIM115 - the child owns a dup of it
        out = handle
    try:
        return subprocess.Popen(
            (die_with_parent_prefix() if die_with_parent else []) + list(argv),
            stdin=subprocess.DEVNULL,
            stdout=out,  # type: ignore[arg-type]
            stderr=None if inherit_output else subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd is not None else None,
            start_new_session=True,  # own session => own process group, pgid == pid
            pass_fds=tuple(pass_fds),
        )
    finally:
        if handle is not None:
            handle.close()


def _exists(kill: Callable[[int, int], None], ident: int) -> bool:
    try:
        kill(ident, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # exists, another user's
        return True
    return True


def group_alive(pgid: int) -> bool:
    """True while any process of the group ``pgid`` exists (zombies included)."""
    return _exists(os.killpg, pgid)


def pid_alive(pid: int) -> bool:
    """True while the process ``pid`` exists (zombies included)."""
    return _exists(os.kill, pid)


def signal_pid(pid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.kill(pid, sig)


def signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


def stop(proc: subprocess.Popen[bytes], grace_s: float = 10.0) -> int | None:
    """SIGTERM the process group, SIGKILL it after ``grace_s``, reap the leader.

    Returns the leader's exit code. Safe to call twice.
    """
    pgid = proc.pid
    if proc.poll() is None:
        signal_group(pgid, signal.SIGTERM)
        try:
            proc.wait(timeout=grace_s)
        except subprocess.TimeoutExpired:
            signal_group(pgid, signal.SIGKILL)
            proc.wait(timeout=10)
    # The leader may have exited while children of its group live on: end them too.
    if group_alive(pgid):
        signal_group(pgid, signal.SIGKILL)
        wait_group_gone(pgid, 5.0)
    return proc.returncode


def wait_group_gone(pgid: int, timeout_s: float) -> bool:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not group_alive(pgid):
            return True
        time.sleep(0.02)
    return not group_alive(pgid)


def proc_start(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot (/proc/PID/stat field 22); None when
    there is no such process. With the pid it names one process for good: pids are reused,
    (pid, start time) pairs are not."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    # The command name may contain spaces and ')': the fields after the last ')' are fixed.
    return int(stat.rsplit(")", 1)[1].split()[19])


def tail(path: Path, lines: int = 40) -> str:
    """The last ``lines`` lines of a log file ('' when it does not exist)."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read()
    except FileNotFoundError:
        return ""
    return "\n".join(data.decode("utf-8", "replace").splitlines()[-lines:])
