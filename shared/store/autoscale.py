"""The autoscaler's hysteresis clocks, kept in Redis so a new scheduling leader goes on
where the last one stopped (in memory, a lease handover restarted every clock)."""

from __future__ import annotations

from collections.abc import Iterable, Mapping

from pydantic import BaseModel
from redis.asyncio.client import Pipeline

from shared.records import BadRecord, parse_scale_mark
from shared.store.base import StoreBase


class ScaleMark(BaseModel):
    """Since when (wall clock) a model's load has asked for more or fewer replicas; for the
    model's ``version`` only (a re-registered alias starts afresh)."""

    version: str
    above_since: float | None = None
    below_since: float | None = None


class AutoscaleStore(StoreBase):
    async def scale_marks(self) -> dict[str, ScaleMark]:
        """Every model's clocks; a mark that does not parse is reported and left out."""
        raw = (await self._hashes([self.k.autoscale]))[0]
        out = {}
        for alias, v in raw.items():
            try:
                out[alias] = parse_scale_mark(self.k.autoscale, alias, v, ScaleMark)
            except BadRecord as e:
                self._skip(e)
        return out

    async def save_scale_marks(self, token: str, marks: Mapping[str, ScaleMark],
                               gone: Iterable[str]) -> None:
        """Write changed clocks and drop those of ``gone`` aliases, fenced by the lease."""
        dropped = list(gone)
        if not marks and not dropped:
            return

        def build(p: Pipeline) -> None:
            if marks:
                p.hset(self.k.autoscale, mapping={a: m.model_dump_json()
                                                  for a, m in marks.items()})
            if dropped:
                p.hdel(self.k.autoscale, *dropped)

        await self._fenced(token, build)
