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

import pytest

from services.worker.engines.base import EngineSockets


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
