"""EngineSockets: where a worker's engines put their Unix sockets (services/worker/engines/
base.py)."""

from __future__ import annotations

import os
import shutil
import stat
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.worker.engines.base import EngineProcess, EngineSockets, Launch
from shared import private_dirs


@pytest.fixture
def short_tmp() -> Iterator[Path]:
    """A temporary directory short enough to hold sockets (pytest's own can be too deep)."""
    path = Path(tempfile.mkdtemp(dir="/tmp"))
    yield path
    shutil.rmtree(path, ignore_errors=True)


def test_a_private_directory_of_short_distinct_paths_removed_on_close(short_tmp: Path) -> None:
    sockets = EngineSockets(str(short_tmp))
    first, second = sockets.new_path(), sockets.new_path()
    assert first != second and Path(first).parent == Path(second).parent
    folder = Path(first).parent
    assert folder.name.startswith(f"svllm-engines-{os.getpid()}-")
    assert stat.S_IMODE(folder.stat().st_mode) == 0o700
    assert len(first) < 100  # a socket's path holds at most 107 bytes
    (folder / "1.sock").touch()  # what an engine killed with SIGKILL leaves
    sockets.close()
    assert not folder.exists()


def test_a_deep_temporary_directory_is_not_used() -> None:
    assert EngineSockets("/x" * 40).base == "/tmp"


def test_the_directories_of_dead_workers_go_and_the_living_ones_stay(short_tmp: Path) -> None:
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    dead = short_tmp / f"svllm-engines-{gone.pid}-abc"
    alive = short_tmp / f"svllm-engines-{os.getppid()}-def"
    other = short_tmp / "svllm-engines-notapid-ghi"
    for d in (dead, alive, other):
        d.mkdir()
        (d / "1.sock").touch()
    sockets = EngineSockets(str(short_tmp))
    sockets.new_path()
    assert not dead.exists() and alive.exists() and other.exists()
    sockets.close()


def test_a_directory_gone_or_no_longer_private_is_replaced(short_tmp: Path) -> None:
    """A /tmp cleaner may remove an idle directory, and its name is public: the next engine
    gets a fresh one of the worker's, never one someone else made in its place."""
    sockets = EngineSockets(str(short_tmp))
    first = Path(sockets.new_path()).parent
    shutil.rmtree(first)
    second = Path(sockets.new_path()).parent
    assert second != first and second.is_dir()
    (second / "1.sock").touch()  # an engine serving there
    second.chmod(0o755)  # opened up by someone
    third = Path(sockets.new_path()).parent
    assert third != second and stat.S_IMODE(third.stat().st_mode) == 0o700
    # Still ours and held: its engine keeps its socket (no sweep takes it) until the stop.
    private_dirs.remove_stale(EngineSockets.PREFIX, short_tmp)
    assert (second / "1.sock").exists()
    sockets.close()
    assert not second.exists() and not third.exists()


async def test_an_engines_control_client_is_closed_by_its_stop(tmp_path: Path) -> None:
    engine = EngineProcess(Launch(["true"]), 0, tmp_path / "e.log", uds="/tmp/none.sock")
    async with httpx.AsyncClient() as shared:
        own = engine.http(shared)
        assert own is not shared and engine.http(shared) is own
        await engine.stop(1.0)
        assert own.is_closed
        plain = EngineProcess(Launch(["true"]), 8000, tmp_path / "p.log")
        assert plain.http(shared) is shared  # on a port: the worker's client


def test_a_directory_is_judged_by_its_owners_lock_not_its_pid(short_tmp: Path) -> None:
    """Two workers of one user in different pid namespaces sharing /tmp: the pid in a
    directory's name means nothing to the other, so the owner's lock decides. A live owner
    (here a child holding the lock, its directory named by a pid that is free here) keeps its
    directory; a dead one's (marked as locked, nobody holding it) goes, whatever its pid."""
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    held = short_tmp / f"svllm-engines-{gone.pid}-live"
    dropped = short_tmp / f"svllm-engines-{os.getppid()}-dead"  # a live pid, a dead owner
    for d in (held, dropped):
        d.mkdir(mode=0o700)
        (d / private_dirs.LOCK_MARK).touch()
    holder = subprocess.Popen(
        [sys.executable, "-c", "import fcntl, os, sys; fd = os.open(sys.argv[1], os.O_RDONLY); "
         "fcntl.flock(fd, fcntl.LOCK_EX); print('held', flush=True); sys.stdin.read()",
         str(held)],
        stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        sockets = EngineSockets(str(short_tmp))
        mine = Path(sockets.new_path()).parent
        assert held.exists() and not dropped.exists()
        assert (mine / private_dirs.LOCK_MARK).exists()
        # This worker's own directory is held too: another worker's sweep keeps it.
        private_dirs.remove_stale(EngineSockets.PREFIX, short_tmp)
        assert mine.exists()
    finally:
        holder.kill()
        holder.wait()
    private_dirs.remove_stale(EngineSockets.PREFIX, short_tmp)
    assert not held.exists()  # its owner died: the kernel let go of the lock
    sockets.close()
    assert not mine.exists()
