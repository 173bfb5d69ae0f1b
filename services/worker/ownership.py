"""Who owns an engine, and the on-disk record of each engine's processes.

An engine belongs to a *pool* (an id kept in Redis, created once) and to the worker *process*
that launched it (pid and start time, so a reused pid is not mistaken for it). Each running
engine has a record, ``STATE_DIR/<worker id>/engines/<pool id>.<alias>.json``, written when it
starts and removed once its processes are gone: its process group, the engine's and the
keeper's pids and start times. A worker starting up ends the engines of records of its own pool
whose launcher is gone (services.worker.orphans); two pools sharing a machine, a worker id and
a state directory leave each other's engines alone.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path

from shared.procs import proc_start

logger = logging.getLogger(__name__)


@dataclass(frozen=True)
class Launcher:
    """A process, told apart from a later one with the same pid by its start time."""

    pid: int
    start: int

    @classmethod
    def this_process(cls) -> Launcher:
        pid = os.getpid()
        return cls(pid, proc_start(pid) or 0)

    def alive(self) -> bool:
        started = proc_start(self.pid)
        return started is not None and started == self.start

    def __str__(self) -> str:
        return f"{self.pid}@{self.start}"


@dataclass(frozen=True)
class EngineRecord:
    pool: str
    worker_id: str
    alias: str
    launcher_pid: int
    launcher_start: int
    keeper_pid: int
    keeper_start: int
    pgid: int
    engine_pid: int
    engine_start: int
    started_at: float

    @property
    def launcher(self) -> Launcher:
        return Launcher(self.launcher_pid, self.launcher_start)

    @property
    def keeper(self) -> Launcher:
        return Launcher(self.keeper_pid, self.keeper_start)


@dataclass(frozen=True)
class Owner:
    """This worker process as the owner of the engines it launches."""

    pool: str
    worker_id: str
    launcher: Launcher
    state_dir: Path

    @property
    def records_dir(self) -> Path:
        return self.state_dir / self.worker_id / "engines"

    def path(self, alias: str, pool: str | None = None) -> Path:
        return self.records_dir / f"{pool or self.pool}.{alias}.json"

    def write(self, rec: EngineRecord) -> None:
        """Write atomically: a crash mid-write must not leave a record the sweep cannot read."""
        self.records_dir.mkdir(parents=True, exist_ok=True)
        final = self.path(rec.alias, rec.pool)
        tmp = final.with_suffix(f".tmp{os.getpid()}")
        tmp.write_text(json.dumps(asdict(rec)))
        os.replace(tmp, final)

    def remove(self, alias: str) -> None:
        with contextlib.suppress(FileNotFoundError):
            self.path(alias).unlink()

    def records(self) -> list[EngineRecord]:
        """Every readable record of this worker id (all pools); unreadable ones are logged."""
        out = []
        for path in sorted(self.records_dir.glob("*.json")):
            try:
                out.append(EngineRecord(**json.loads(path.read_text())))
            except (OSError, ValueError, TypeError) as e:
                logger.warning("ignoring unreadable engine record %s: %s", path, e)
        return out

    def record(self, alias: str, keeper: Launcher, pgid: int, engine: Launcher) -> EngineRecord:
        return EngineRecord(
            pool=self.pool, worker_id=self.worker_id, alias=alias,
            launcher_pid=self.launcher.pid, launcher_start=self.launcher.start,
            keeper_pid=keeper.pid, keeper_start=keeper.start, pgid=pgid,
            engine_pid=engine.pid, engine_start=engine.start, started_at=time.time(),
        )


@dataclass(frozen=True)
class KeeperOptions:
    """How engines are kept: graces (normal stop; after the worker died) and the extra
    environment names they may see (ENGINE_ENV_PASSTHROUGH)."""

    stop_grace_s: float = 15.0
    orphan_grace_s: float = 5.0
    env_passthrough: tuple[str, ...] = ()


# A worker that died cannot wait for a graceful engine shutdown: its engines get this long.
ORPHAN_GRACE_S = 5.0

