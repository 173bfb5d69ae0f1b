"""Finding engines a crashed worker left behind, so none keeps GPU memory.

Every engine process (and every process it spawns) inherits the environment variable
``SVLLM_ENGINE_OF=<prefix>:<worker>/<alias>``. A worker starting up looks for processes
carrying its own owner name (key prefix and worker id) and ends their process groups before it
starts anything: the previous incarnation's engines are not its children, it cannot supervise
them, and their assignments may have moved.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from pathlib import Path

from services.worker.engines.base import ORPHAN_MARKER
from shared import procs

logger = logging.getLogger(__name__)


def _marker(pid: int) -> str | None:
    try:
        env = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:  # gone, or not ours to read
        return None
    for item in env.split(b"\0"):
        if item.startswith(ORPHAN_MARKER.encode() + b"="):
            return item.split(b"=", 1)[1].decode("utf-8", "replace")
    return None


def find_orphans(owner: str) -> dict[int, str]:
    """pid -> alias of every process marked as an engine of ``owner``."""
    me = os.getpid()
    out: dict[int, str] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit() or int(entry.name) == me:
            continue
        mark = _marker(int(entry.name))
        if mark and mark.split("/", 1)[0] == owner:
            out[int(entry.name)] = mark.split("/", 1)[-1]
    return out


def kill_orphans(owner: str, grace_s: float) -> dict[int, str]:
    """End the process groups of ``owner``'s leftover engines; SIGKILL after ``grace_s``."""
    found = find_orphans(owner)
    groups = {g for g in (_pgid(p) for p in found) if g is not None}
    for g in groups:
        procs.signal_group(g, signal.SIGTERM)
    deadline = time.monotonic() + grace_s
    while time.monotonic() < deadline and any(procs.group_alive(g) for g in groups):
        time.sleep(0.05)
    for g in groups:
        procs.signal_group(g, signal.SIGKILL)
    for pid, alias in found.items():
        logger.warning("killed orphaned engine process %d of %s (left by a previous run of "
                       "worker %s)", pid, alias, owner)
    return found


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except ProcessLookupError:
        return None
