"""Private directories for a process's Unix sockets (the router's siblings, the worker's
engines): made by ``mkdtemp`` (mode 0700, so only this user can connect) under the temporary
directory, or /tmp where that is too deep for a socket's address, so that a later owner
removes those of owners that died without cleaning up (SIGKILL).

Whether an owner is alive is read from a lock, not its pid: each owner holds an exclusive
``flock`` on a file in its directory for as long as it runs, and the kernel lets go of it when
the process dies, however it dies. The owner's pid, also in the directory's name, says nothing
to a process in another pid namespace (two containers of one user sharing /tmp): there, a live
owner's pid may be free, or taken by an unrelated process. Directories without the lock file
(made by an earlier release) fall back to the pid."""

from __future__ import annotations

import contextlib
import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from shared import procs

# A Unix socket's path holds at most 107 bytes (sun_path); a directory's name adds the prefix,
# a pid, "-" and mkdtemp's 8 characters, and a socket's name up to 10 more ("/1024.sock").
SUN_PATH_MAX = 107
LOCK_NAME = ".owner.lock"

# Directory -> the open lock file this process holds it by (until release() or its exit).
_held: dict[Path, int] = {}


def short_root(prefix: str, tmpdir: str | None = None) -> Path:
    """Where such directories go: the temporary directory ($TMPDIR), unless its path is so
    long that the sockets inside would not fit a Unix socket address (a deep $TMPDIR, e.g.
    under a test runner's), then /tmp."""
    root = Path(tmpdir or tempfile.gettempdir())
    if len(str(root)) + 1 + len(prefix) + 7 + 1 + 8 + len("/1024.sock") > SUN_PATH_MAX:
        return Path("/tmp")
    return root


def make(prefix: str, root: Path) -> Path:
    """A new private directory of this process under ``root``, held by its lock."""
    for _ in range(3):
        d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
        try:
            # Non-inheritable (PEP 446): an engine or a sibling started later does not hold it.
            fd = os.open(d / LOCK_NAME, os.O_CREAT | os.O_EXCL | os.O_RDWR | os.O_NOFOLLOW,
                         0o600)
        except FileNotFoundError:
            # Removed in the instant before its lock existed, by another namespace's
            # remove_stale that took it for a dead owner's: make another.
            continue
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)  # new and ours: never contended
        _held[d] = fd
        return d
    raise OSError(f"could not make a private directory under {root}")


def release(d: Path) -> None:
    """Let go of ``d``'s lock without removing it (it is no longer this process's: gone, or
    replaced by someone else's)."""
    fd = _held.pop(d, None)
    if fd is not None:
        os.close(fd)


def remove(d: Path) -> None:
    """Remove a directory this process made, with what is left in it, and let go of it."""
    shutil.rmtree(d, ignore_errors=True)
    release(d)


def remove_stale(prefix: str, root: Path) -> None:
    """Remove the directories under ``root`` left by owners that died without cleaning up:
    those of this user whose lock nobody holds (this process's own are held)."""
    for d in root.glob(f"{prefix}*-*"):
        pid = d.name.removeprefix(prefix).split("-", 1)[0]
        try:
            if not pid.isdigit() or d.is_symlink() or d.stat().st_uid != os.getuid():
                continue
        except OSError:
            continue
        _remove_if_unheld(d, int(pid))


def _remove_if_unheld(d: Path, pid: int) -> None:
    try:
        fd = os.open(d / LOCK_NAME, os.O_RDWR | os.O_NOFOLLOW)
    except FileNotFoundError:
        # An earlier release's directory (no lock file), or one being made this instant:
        # its owner's pid decides, as before.
        if not procs.pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
        return
    except OSError:
        return  # not ours to judge (a link, no permission): keep it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its owner runs, in this pid namespace or another
        shutil.rmtree(d, ignore_errors=True)  # removed while held: nobody else judges it
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
