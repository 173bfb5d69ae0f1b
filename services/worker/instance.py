"""One engine instance as the worker's supervisor keeps it, and its record in Redis."""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field
from pathlib import Path

from services.worker.engines.base import EngineProcess
from shared.models import Assignment, InstanceState
from shared.store import StoredModel

S = InstanceState

# States in which an instance owns a live engine process.
LIVE = (S.STARTING, S.WARMING, S.RUNNING, S.SLEEPING, S.STOPPING)


@dataclass
class Instance:
    alias: str
    assignment: Assignment
    model: StoredModel
    state: InstanceState = S.PENDING
    engine: EngineProcess | None = None
    error: str = ""
    note: str = ""
    log_tail: str = ""
    failures: int = 0
    retry_at: float = 0.0
    started_at: float = field(default_factory=time.time)
    healthy_at: float = 0.0
    ready_at: float = 0.0
    awake_at: float = 0.0
    # Last time the instance became able to serve (after a start or a wake): the idle clock
    # starts here when no request has come since.
    active_at: float = 0.0
    sleep_level: int = 0
    # Host RAM held (or about to be) by this instance's level-1 sleep.
    ram_claim_mb: int = 0
    warmup_s: float = 0.0
    inflight: int = 0
    last_request_at: float = 0.0
    task: asyncio.Task[None] | None = None
    # Route withdrawn while requests already sent finish (before a sleep).
    draining: bool = False
    # Consecutive failed health checks while RUNNING; any takes the route away.
    health_failures: int = 0
    # The last write of record and route failed: the supervisor writes them again.
    unsynced: bool = False

    @property
    def serving(self) -> bool:
        """Whether routers may send requests here: what the route in Redis says."""
        return self.state is S.RUNNING and not self.draining and self.health_failures == 0

    @property
    def busy(self) -> bool:
        """A transition (start, sleep, wake) is under way."""
        return self.task is not None and not self.task.done()

    def usage(self) -> tuple[int, float]:
        return self.inflight, self.last_request_at

    def record(self) -> dict[str, str]:
        e = self.engine
        rec = e.record if e else None
        return {
            "state": self.state.value,
            "target": self.assignment.target,
            "engine": self.model.spec.engine,
            "model_name": self.model.spec.model_name,
            "port": str(e.port if e else 0),
            "socket": (e.uds or "") if e else "",  # the engine's Unix socket; port 0 then
            "pid": str(e.pid if e and e.pid else 0),
            # The engine's process tree as the worker owns it (services.worker.ownership).
            "pgid": str(rec.pgid if rec else 0),
            "keeper_pid": str(rec.keeper_pid if rec else 0),
            "launcher": f"{rec.pool}/{rec.launcher}" if rec else "",
            "gpus": ",".join(str(g) for g in self.assignment.gpus),
            "source": self.assignment.source,
            "epoch": str(self.assignment.epoch),
            "started_at": repr(self.started_at),
            "healthy_at": repr(self.healthy_at),
            "ready_at": repr(self.ready_at),
            "awake_at": repr(self.awake_at),
            "active_at": repr(self.active_at),
            "sleep_level": str(self.sleep_level),
            "warmup_s": f"{self.warmup_s:.4f}",
            "inflight": str(self.inflight),
            "last_request_at": repr(self.last_request_at),
            "updated_at": repr(time.time()),
            "error": self.error,
            "note": self.note,
            "log_tail": self.log_tail,
            "failures": str(self.failures),
            "retry_at": repr(self.retry_at),
        }


def dir_size_mb(path: str) -> int | None:
    """Size of a local model directory (its weights), or None when it is not a local dir."""
    p = Path(path)
    if not p.is_dir():
        return None
    return sum(f.stat().st_size for f in p.rglob("*") if f.is_file()) // (1024 * 1024)


def host_ram_mb(inst: Instance) -> int:
    """Host RAM a level-1 sleep of ``inst`` takes: its weights, as well as can be told."""
    spec = inst.model.spec
    if spec.weights_mb is not None:
        return spec.weights_mb
    size = dir_size_mb(spec.model_name)
    return size if size is not None else inst.assignment.mb_per_gpu * len(inst.assignment.gpus)
