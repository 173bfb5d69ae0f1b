"""The engine keeper on real processes: it ends the whole tree when asked, when its worker's
end of the socket closes (the worker died), and when the engine leader exits; descendants that
ignore SIGTERM, leave the process group or lose their parent are ended too."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from services.worker.engines.base import KEEPER_PATH, EngineExited, EngineProcess, Launch
from services.worker.ownership import KeeperOptions, Launcher, Owner
from shared import procs
from tests.support import wait_until

# An "engine" that starts a grandchild ignoring SIGTERM and writes its pid to a file; the
# grandchild optionally leaves the process group (setsid), as nothing in our control forbids.
ENGINE = """
import os, signal, subprocess, sys, time
setsid = sys.argv[2] == "setsid"
child = subprocess.Popen([sys.executable, "-c",
    "import os, signal, time\\n"
    + ("os.setsid()\\n" if setsid else "")
    + "signal.signal(signal.SIGTERM, signal.SIG_IGN)\\n"
    + "open(%r, 'w').write(str(os.getpid()))\\n" % sys.argv[1]
    + "while True: time.sleep(60)\\n"])
exit_code = int(sys.argv[3])
if exit_code >= 0:
    while not os.path.exists(sys.argv[1]):
        time.sleep(0.01)
    time.sleep(0.2)
    sys.exit(exit_code)
while True:
    time.sleep(60)
"""


class Kept:
    def __init__(self, tmp: Path, setsid: bool = False, exit_code: int = -1,
                 grace: float = 0.5) -> None:
        self.pidfile = tmp / f"grandchild-{time.monotonic_ns()}"
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-I", KEEPER_PATH, "--fd", str(theirs.fileno()),
                "--grace", str(grace), "--orphan-grace", str(grace), "--",
                sys.executable, "-c", ENGINE, str(self.pidfile),
                "setsid" if setsid else "-", str(exit_code)]
        self.keeper = procs.spawn(argv, pass_fds=(theirs.fileno(),), log_path=tmp / "keeper.log")
        theirs.close()
        self.sock = ours
        ours.settimeout(30)
        self.report = json.loads(ours.makefile().readline())
        self.grandchild = int(wait_until(self._grandchild, 15, what="grandchild started"))

    def _grandchild(self) -> str | None:
        text = self.pidfile.read_text() if self.pidfile.exists() else ""
        return text or None

    def all_gone(self) -> bool:
        alive = [p for p in (self.report["pid"], self.grandchild)
                 if procs.proc_start(p) is not None and not _zombie(p)]
        return not alive and not procs.group_alive(self.report["pgid"])

    def cleanup(self) -> None:
        for pid in (self.report["pid"], self.grandchild):
            procs.signal_pid(pid, signal.SIGKILL)
        procs.signal_group(self.report["pgid"], signal.SIGKILL)
        if self.keeper.poll() is None:
            self.keeper.kill()
        self.keeper.wait(5)
        self.sock.close()


def _zombie(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z"
    except OSError:
        return False


@pytest.fixture
def kept(tmp_path: Path) -> Iterator[list[Kept]]:
    made: list[Kept] = []
    yield made
    for k in made:
        k.cleanup()


def test_report_names_the_engine_group(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path)
    kept.append(k)
    assert k.report["event"] == "started"
    assert k.report["pgid"] == k.report["pid"] != k.keeper.pid
    assert os.getpgid(k.report["pid"]) == k.report["pid"]
    assert k.report["start"] == procs.proc_start(k.report["pid"])
    assert os.getpgid(k.grandchild) == k.report["pgid"]


def test_stop_ends_a_tree_that_ignores_sigterm(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path, grace=0.5)
    kept.append(k)
    k.sock.sendall(b"stop\n")
    assert k.keeper.wait(10) == 128 + signal.SIGTERM  # the leader died of the SIGTERM
    assert k.all_gone()  # the grandchild ignored SIGTERM: SIGKILL after the grace


def test_worker_gone_ends_the_tree(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path)
    kept.append(k)
    k.sock.close()  # what the kernel does when the worker is killed -9
    k.keeper.wait(10)
    assert k.all_gone()


def test_descendant_that_left_the_group_is_ended(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path, setsid=True)
    kept.append(k)
    assert os.getpgid(k.grandchild) != k.report["pgid"]  # out of reach of a group kill
    k.sock.close()
    k.keeper.wait(10)
    assert k.all_gone()


def test_leader_exit_ends_leftovers_and_keeps_its_code(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path, exit_code=3)
    kept.append(k)
    assert k.keeper.wait(10) == 3
    assert k.all_gone()


def test_sigterm_to_the_keeper_is_a_stop(kept: list[Kept], tmp_path: Path) -> None:
    k = Kept(tmp_path)
    kept.append(k)
    k.keeper.send_signal(signal.SIGTERM)
    k.keeper.wait(10)
    assert k.all_gone()


def test_engine_that_cannot_start(tmp_path: Path) -> None:
    ours, theirs = socket.socketpair()
    argv = [sys.executable, "-I", KEEPER_PATH, "--fd", str(theirs.fileno()), "--",
            str(tmp_path / "no-such-engine")]
    keeper = subprocess.Popen(argv, pass_fds=(theirs.fileno(),), stderr=subprocess.DEVNULL)
    theirs.close()
    assert keeper.wait(10) != 0
    ours.settimeout(5)
    assert ours.recv(100) == b""  # no "started" report: the worker sees EOF
    ours.close()


async def test_engine_process_lifecycle_and_record(tmp_path: Path) -> None:
    owner = Owner("pool1", "w1", Launcher.this_process(), tmp_path)
    sleeper = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]
    engine = EngineProcess(Launch(sleeper), 1, tmp_path / "e.log")
    await engine.start(owner, "a", KeeperOptions(stop_grace_s=1.0))
    assert engine.record is not None and engine.pid == engine.record.pgid
    assert engine.exit_code() is None and not engine.gone()
    assert [r.alias for r in owner.records()] == ["a"]
    assert owner.records()[0].launcher == owner.launcher
    assert await engine.stop(1.0) == 128 + signal.SIGTERM
    assert engine.gone() and owner.records() == []
    assert await engine.stop(1.0) == 128 + signal.SIGTERM  # twice is fine


async def test_engine_that_exits_at_once_reports_its_code(tmp_path: Path) -> None:
    owner = Owner("pool1", "w1", Launcher.this_process(), tmp_path)
    engine = EngineProcess(Launch([str(tmp_path / "no-such-engine")]), 1, tmp_path / "e.log")
    try:
        await engine.start(owner, "a", KeeperOptions(stop_grace_s=1.0))
    except EngineExited as e:  # no setpriv here: the keeper itself could not start it
        assert "code 127" in str(e)
        return
    async with httpx.AsyncClient() as client:
        with pytest.raises(EngineExited, match="exited with code 127"):
            await engine.wait_ready(client, 10)
    await engine.stop(1.0)


async def test_leader_exit_is_known_before_the_leftovers_are_gone(tmp_path: Path) -> None:
    """The keeper says the leader exited at once; ending a leftover that ignores SIGTERM
    takes the grace, and only then is the engine gone."""
    owner = Owner("pool1", "w1", Launcher.this_process(), tmp_path)
    pidfile = tmp_path / "grandchild"
    argv = [sys.executable, "-c", ENGINE, str(pidfile), "-", "3"]
    engine = EngineProcess(Launch(argv), 1, tmp_path / "e.log")
    await engine.start(owner, "a", KeeperOptions(stop_grace_s=3.0))
    try:
        wait_until(lambda: engine.exit_code() == 3, 10, what="leader exit reported")
        assert engine.keeper is not None and engine.keeper.poll() is None
        assert not engine.gone()  # the grandchild ignores SIGTERM: it waits out the grace
        wait_until(engine.gone, 15, what="leftovers ended after the grace")
        assert engine.exit_code() == 3
    finally:
        await engine.stop(1.0)


async def test_a_start_cancelled_midway_is_stopped_not_leaked(tmp_path: Path) -> None:
    """The instance is stopped while its engine is still starting (the start task is
    cancelled): stop() waits for the start to finish, then ends the engine."""
    owner = Owner("pool1", "w1", Launcher.this_process(), tmp_path)
    sleeper = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]
    engine = EngineProcess(Launch(sleeper), 1, tmp_path / "e.log")
    task = asyncio.ensure_future(engine.start(owner, "a", KeeperOptions(stop_grace_s=1.0)))
    await asyncio.sleep(0)  # the start's thread is running
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert not engine.gone()  # still starting: not yet known to be gone
    assert await engine.stop(1.0) == 128 + signal.SIGTERM
    assert engine.record is not None and not procs.group_alive(engine.record.pgid)
    assert engine.gone() and owner.records() == []
