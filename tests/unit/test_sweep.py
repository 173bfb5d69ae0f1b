"""The restart sweep on real processes: by recorded group, only this pool's, only when the
launching worker process is gone."""

from __future__ import annotations

import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from services.worker.orphans import sweep
from services.worker.ownership import Launcher, Owner
from shared import procs

SLEEPER = [sys.executable, "-c", "import time\nwhile True: time.sleep(60)"]
GONE = Launcher(pid=2**22 + 7, start=1)  # no such process
ME = Launcher.this_process()


@pytest.fixture
def groups() -> Iterator[list[subprocess.Popen[bytes]]]:
    made: list[subprocess.Popen[bytes]] = []
    yield made
    for p in made:
        procs.stop(p, 1.0)


def engine(groups: list[subprocess.Popen[bytes]]) -> Launcher:
    p = procs.spawn(SLEEPER)
    groups.append(p)
    return Launcher(p.pid, procs.proc_start(p.pid) or 0)


def owner(tmp: Path, pool: str, launcher: Launcher) -> Owner:
    return Owner(pool=pool, worker_id="vm", launcher=launcher, state_dir=tmp)


def recorded(o: Owner, alias: str, eng: Launcher) -> None:
    o.write(o.record(alias, keeper=GONE, pgid=eng.pid, engine=eng))


def test_sweeps_only_this_pools_engines_of_dead_launchers(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]]
) -> None:
    orphan, other_pool, live_launcher = engine(groups), engine(groups), engine(groups)
    recorded(owner(tmp_path, "poolA", GONE), "orphan", orphan)
    recorded(owner(tmp_path, "poolB", GONE), "theirs", other_pool)
    recorded(owner(tmp_path, "poolA", ME), "running", live_launcher)

    me = owner(tmp_path, "poolA", Launcher(ME.pid, ME.start))
    swept = sweep(me, grace_s=1.0)
    assert [r.alias for r in swept] == ["orphan"]
    assert groups[0].wait(5) == -15  # SIGTERM; reaped here, as init would reap an orphan
    assert not procs.group_alive(orphan.pid)
    assert procs.group_alive(other_pool.pid) and procs.group_alive(live_launcher.pid)
    names = sorted(p.name for p in me.records_dir.iterdir())
    assert names == ["poolA.running.json", "poolB.theirs.json"]


def test_gone_engine_drops_its_record_quietly(tmp_path: Path) -> None:
    dead = subprocess.Popen([*SLEEPER[:2], "pass"])
    dead.wait()
    o = owner(tmp_path, "p", GONE)
    recorded(o, "old", Launcher(dead.pid, 12345))
    assert sweep(o, 1.0) == []
    assert list(o.records_dir.iterdir()) == []


def test_reused_group_number_is_not_killed(
    tmp_path: Path, groups: list[subprocess.Popen[bytes]]
) -> None:
    stranger = engine(groups)
    o = owner(tmp_path, "p", GONE)
    # The record's engine started at another time: the live group with its number is not it.
    recorded(o, "old", Launcher(stranger.pid, stranger.start + 1))
    assert sweep(o, 1.0) == []
    assert procs.group_alive(stranger.pid)


def test_unreadable_record_is_skipped(tmp_path: Path) -> None:
    o = owner(tmp_path, "p", GONE)
    o.records_dir.mkdir(parents=True)
    (o.records_dir / "p.bad.json").write_text("{not json")
    assert sweep(o, 1.0) == []
