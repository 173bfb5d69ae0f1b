"""Private directories for a process's Unix sockets (the router's siblings, the worker's
engines): made by ``mkdtemp`` (mode 0700, so only this user can connect) under the temporary
directory, or /tmp where that is too deep for a socket's address, and named by a prefix and
the owner's pid, so that a later owner removes those of owners that died without cleaning up
(SIGKILL)."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

from shared import procs

# A Unix socket's path holds at most 107 bytes (sun_path); a directory's name adds the prefix,
# a pid, "-" and mkdtemp's 8 characters, and a socket's name up to 10 more ("/1024.sock").
SUN_PATH_MAX = 107


def short_root(prefix: str, tmpdir: str | None = None) -> Path:
    """Where such directories go: the temporary directory ($TMPDIR), unless its path is so
    long that the sockets inside would not fit a Unix socket address (a deep $TMPDIR, e.g.
    under a test runner's), then /tmp."""
    root = Path(tmpdir or tempfile.gettempdir())
    if len(str(root)) + 1 + len(prefix) + 7 + 1 + 8 + len("/1024.sock") > SUN_PATH_MAX:
        return Path("/tmp")
    return root


def make(prefix: str, root: Path) -> Path:
    """A new private directory of this process under ``root``."""
    return Path(tempfile.mkdtemp(prefix=f"{prefix}{os.getpid()}-", dir=root))


def remove_stale(prefix: str, root: Path) -> None:
    """Remove the directories under ``root`` left by owners that died without cleaning up:
    those of this user whose owner pid no longer runs."""
    for d in root.glob(f"{prefix}*-*"):
        pid = d.name.removeprefix(prefix).split("-", 1)[0]
        try:
            if not pid.isdigit() or d.stat().st_uid != os.getuid() or procs.pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(d, ignore_errors=True)
