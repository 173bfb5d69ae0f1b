"""Parsing Redis records: one function per record type, and the log of records that failed.

A record someone corrupted (by hand, a bug, an old version) must cost only itself: every read
goes through the parser of its type, which raises :class:`BadRecord` naming the key and the
reason; the store skips that record, reports it to :class:`Problems` (logged once per key and
reason, then at most every ``log_every_s``) and returns everything else. ``/admin/status``
lists what was reported during its own read under ``problems``.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from typing import Any, TypeVar

import orjson
from pydantic import BaseModel, ValidationError

from shared.models import Assignment, GpuInfo, InstanceState, ModelSpec, Reservation, WorkerView

logger = logging.getLogger(__name__)

M = TypeVar("M", bound=BaseModel)


class BadRecord(ValueError):
    """A Redis record that cannot be read: its ``key`` (and ``field``, for one entry of a
    hash such as an assignment) and what is wrong with it."""

    def __init__(self, key: str, reason: str, field: str | None = None) -> None:
        super().__init__(f"{key}{f' [{field}]' if field else ''}: {reason}")
        self.key = key
        self.field = field
        self.reason = reason


class Problems:
    """Bad records seen by this process: when each was last seen, and a rate-limited log."""

    def __init__(self, log_every_s: float = 60.0, keep: int = 10_000) -> None:
        self.log_every_s = log_every_s
        self.keep = keep
        self._seen: dict[tuple[str, str], tuple[str, float]] = {}
        self._logged: dict[tuple[str, str, str], float] = {}

    def report(self, err: BadRecord) -> None:
        now = time.monotonic()
        self._seen[(err.key, err.field or "")] = (err.reason, now)
        mark = (err.key, err.field or "", err.reason)
        last = self._logged.get(mark)
        if last is None or now - last >= self.log_every_s:
            # Once per key and reason per period: a pass every second over a bad record
            # must not flood the log (it did: ~24 traceback lines/s).
            logger.warning("skipping bad record: %s", err)
            self._logged[mark] = now
        if len(self._seen) > self.keep:
            self._prune(now)

    def _prune(self, now: float) -> None:
        old = now - 10 * self.log_every_s
        self._seen = {k: v for k, v in self._seen.items() if v[1] >= old}
        self._logged = {k: t for k, t in self._logged.items() if t >= old}

    def since(self, t: float) -> list[dict[str, str | None]]:
        """The records reported at or after ``t`` (``time.monotonic()``), by key: ``key``,
        ``field`` (the hash field, for an entry of a hash; else None) and ``reason``."""
        return [{"key": k, "field": f or None, "reason": r}
                for (k, f), (r, at) in sorted(self._seen.items()) if at >= t]


def _short(e: Exception) -> str:
    if isinstance(e, ValidationError):
        first = e.errors()[0]
        where = ".".join(str(p) for p in first.get("loc", ())) or "value"
        return f"{where}: {first.get('msg', 'invalid')} ({e.error_count()} error(s))"
    return str(e).split("\n")[0][:200]


def _json_model(key: str, cls: type[M], raw: str, what: str, field: str | None = None) -> M:
    try:
        return cls.model_validate_json(raw)
    except ValidationError as e:
        raise BadRecord(key, f"{what} is not a valid {cls.__name__}: {_short(e)}",
                        field) from None


def _json(key: str, raw: str, field: str) -> Any:
    try:
        return orjson.loads(raw)
    except orjson.JSONDecodeError as e:
        raise BadRecord(key, f"not JSON: {_short(e)}", field) from None


def _number(key: str, field: str, raw: str, kind: type[int] | type[float]) -> None:
    if raw == "":
        return  # an unset number (readers take it as 0)
    try:
        value = kind(raw)
    except ValueError:
        raise BadRecord(key, f"not a number: {raw[:40]!r}", field) from None
    if not math.isfinite(value):
        raise BadRecord(key, f"not finite: {raw[:40]!r}", field)


def parse_model_spec(key: str, alias: str, raw: str) -> ModelSpec:
    spec = _json_model(key, ModelSpec, raw, "the spec", "spec")
    if spec.alias != alias:
        raise BadRecord(key, f"the spec is for alias '{spec.alias}', not '{alias}'", "spec")
    return spec


def parse_created_at(key: str, raw: Mapping[str, str]) -> float:
    value = raw.get("created_at", "0")
    _number(key, "created_at", value, float)
    return float(value)


WORKER_JSON_FIELDS = ("engines", "gpus", "load")
WORKER_FIELDS = ("url", *WORKER_JSON_FIELDS, "gpu_message", "version", "max_cpu_engines",
                 "local_models", "cache_free_mb",
                 "registered_at", "last_seen", "vllm_version", "vllm_flags")


def parse_worker(key: str, worker_id: str, raw: Mapping[str, str], alive: bool) -> WorkerView:
    """A ``worker:{id}`` hash (every field optional, as a registration in progress has few)."""
    engines = _json(key, raw.get("engines", "[]"), "engines")
    gpus = _json(key, raw.get("gpus", "[]"), "gpus")
    load = _json(key, raw.get("load", "{}"), "load")
    for field in ("registered_at", "last_seen"):
        _number(key, field, raw.get(field, "0"), float)
    if not isinstance(gpus, list):
        raise BadRecord(key, "not a list", "gpus")
    try:
        return WorkerView(
            worker_id=worker_id, url=raw.get("url", ""), alive=alive, engines=engines,
            gpus=[GpuInfo.model_validate(g) for g in gpus],
            gpu_message=raw.get("gpu_message", ""), version=raw.get("version", ""),
            registered_at=float(raw.get("registered_at", 0)),
            last_seen=float(raw.get("last_seen", 0)), load=load,
            max_cpu_engines=_cap(key, raw.get("max_cpu_engines", "")),
            vllm_version=raw.get("vllm_version", ""),
            local_models=_json(key, raw.get("local_models", "[]"), "local_models"),
            cache_free_mb=_cap(key, raw.get("cache_free_mb", ""), "cache_free_mb"))
    except ValidationError as e:
        raise BadRecord(key, f"not a valid worker record: {_short(e)}") from None


def _cap(key: str, value: str, field: str = "max_cpu_engines") -> int | None:
    """A worker's reported whole number ('' or absent: none reported), such as its cap on
    engines without GPUs."""
    if value == "":
        return None
    _number(key, field, value, int)
    return int(value)


def parse_assignment(key: str, worker_id: str, alias: str, raw: str) -> Assignment:
    """One field of an ``assign:{worker}`` hash."""
    a = _json_model(key, Assignment, raw, "the assignment", alias)
    if a.alias != alias or a.worker_id != worker_id:
        raise BadRecord(key, f"the assignment names {a.alias} on {a.worker_id}", alias)
    return a


def parse_reservation(key: str, alias: str, raw: str) -> Reservation:
    """One field of a ``ledger:{worker}`` hash."""
    r = _json_model(key, Reservation, raw, "the reservation", alias)
    if r.alias != alias:
        raise BadRecord(key, f"the reservation names {r.alias}", alias)
    return r


INSTANCE_INTS = ("port", "pid", "pgid", "keeper_pid", "sleep_level", "inflight", "failures",
                 "epoch")
INSTANCE_FLOATS = ("started_at", "healthy_at", "ready_at", "awake_at", "active_at", "warmup_s",
                   "last_request_at", "updated_at", "retry_at")
_STATES = frozenset(s.value for s in InstanceState)


def parse_instance(key: str, raw: dict[str, str]) -> dict[str, str]:
    """An ``instance:{alias}:{worker}`` hash, returned as is once its numbers and state read."""
    state = raw.get("state")
    if state is not None and state not in _STATES:
        raise BadRecord(key, f"not a state: {state[:40]!r}", "state")
    for field in INSTANCE_INTS:
        if field in raw:
            _number(key, field, raw[field], int)
    for field in INSTANCE_FLOATS:
        if field in raw:
            _number(key, field, raw[field], float)
    return raw


def parse_load(key: str, worker_id: str, raw: str) -> float:
    """One field of a ``load:{alias}`` hash: the engine's running + waiting requests."""
    _number(key, worker_id, raw, float)
    return float(raw or 0)


def parse_timings(key: str, raw: Mapping[str, str]) -> dict[str, float]:
    """A ``stats:{alias}`` hash: every field a number."""
    for field, v in raw.items():
        _number(key, field, v, float)
    return {field: float(v or 0) for field, v in raw.items()}


def parse_scale_mark(key: str, alias: str, raw: str, cls: type[M]) -> M:
    """One field of the ``autoscale`` hash."""
    return _json_model(key, cls, raw, "the scale mark", alias)


def parse_counter(key: str, raw: str | None) -> int:
    """A version counter (``version:models``, ``version:routes``): absent reads as 0."""
    if raw is None:
        return 0
    try:
        return int(raw)
    except ValueError:
        raise BadRecord(key, f"not an integer: {raw[:40]!r}") from None


def parse_samples(key: str, raw: list[str]) -> list[float]:
    for i, v in enumerate(raw):
        _number(key, f"#{i}", v, float)
    return [float(v) for v in raw]
