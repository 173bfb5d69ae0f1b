"""Private directories for a process's Unix sockets (the router's siblings, the worker's
engines): made by ``mkdtemp`` (mode 0700, so only this user can connect) under the temporary
directory, or /tmp where that is too deep for a socket's address, so that a later owner
removes those of owners that died without cleaning up (SIGKILL).

Whether an owner is alive is read from a lock, not its pid: each owner holds an exclusive
``flock`` on its directory for as long as it runs, and the kernel lets go of it when the
process dies, however it dies. The owner's pid, also in the directory's name, says nothing to
a process in another pid namespace (two containers of one user sharing /tmp): there, a live
owner's pid may be free, or taken by an unrelated process. A held lock also keeps
systemd-tmpfiles away from the directory and its sockets. The file ``LOCK_MARK`` in a
directory says its owner locks it; directories without it (made by an earlier release, or
in the instant before it exists) are judged by the pid, as before."""

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
LOCK_MARK = ".flocked"
_DIR_FLAGS = os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW

# Directory -> the open directory this process holds its lock by (until release() or exit).
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
    for _ in range(5):
        d = Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))
        try:
            # Non-inheritable (PEP 446): an engine or a sibling started later does not hold it.
            fd = os.open(d, _DIR_FLAGS)
        except OSError:
            continue  # removed in the instant after mkdtemp (see below): another one
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            (d / LOCK_MARK).touch(mode=0o600)
        except OSError:
            # Another owner's sweep took it in that instant (it had no mark yet, and in
            # another pid namespace our pid may look dead): it removes it; another one.
            os.close(fd)
            continue
        _held[d] = fd
        return d
    raise OSError(f"could not make a private directory under {root}")


def owns(d: Path) -> bool:
    """Whether this process holds ``d`` and the path still names that directory (not one
    made in its place after it was removed)."""
    fd = _held.get(d)
    if fd is None:
        return False
    try:
        here, held = os.lstat(d), os.fstat(fd)
    except OSError:
        return False
    return (here.st_dev, here.st_ino) == (held.st_dev, held.st_ino)


def release(d: Path) -> None:
    """Let go of ``d``'s lock without removing it (gone, or no longer this process's)."""
    fd = _held.pop(d, None)
    if fd is not None:
        os.close(fd)


def remove(d: Path) -> None:
    """Remove a directory this process made, with what is left in it, and let go of it. A
    path that no longer names the directory it made (removed, something else in its place)
    is left alone."""
    if owns(d):
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
    if not (d / LOCK_MARK).exists():
        # An earlier release's directory, or one being made this instant: its owner's pid
        # decides, as before.
        if not procs.pid_alive(pid):
            shutil.rmtree(d, ignore_errors=True)
        return
    try:
        fd = os.open(d, _DIR_FLAGS)
    except OSError:
        return  # gone, or not ours to judge: keep it
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return  # its owner runs, in this pid namespace or another
        shutil.rmtree(d, ignore_errors=True)  # removed while held: nobody else judges it
    finally:
        with contextlib.suppress(OSError):
            os.close(fd)
