"""Reads for the admin API: whole-pool views in a fixed number of round trips.

``/admin/models`` used to make about five sequential round trips per model (instances,
placement reason, queue length, stats); here every model's parts come from two pipelines,
whatever the number of models.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from shared.records import BadRecord, parse_counter
from shared.store.lifecycle import TIMING_KINDS, LifecycleStore
from shared.store.observed import ObservedStore
from shared.store.scheduling import SchedulingStore


@dataclass(frozen=True)
class ModelDetails:
    """What the admin views show of one alias, besides its spec."""

    instances: dict[str, dict[str, str]]
    placement: str | None
    waiting_requests: int
    stats: dict[str, Any]


class AdminReads(SchedulingStore, ObservedStore, LifecycleStore):
    async def model_details(self, aliases: list[str]) -> dict[str, ModelDetails]:
        """Instances, placement reason, queue length and timings of every alias, pipelined."""
        instances = await self.instances_by_alias(aliases)
        async with self.r.pipeline(transaction=False) as pipe:
            for a in aliases:
                pipe.hget(self.k.placement(a), "reason")
                pipe.zcard(self.k.queue(a))
                pipe.hgetall(self.k.stats(a))
                for kind in TIMING_KINDS:
                    pipe.lrange(self.k.samples(a, kind), 0, -1)
            flat = await pipe.execute(raise_on_error=False)
        per = 3 + len(TIMING_KINDS)
        out = {}
        for i, a in enumerate(aliases):
            reason, waiting, stats, *samples = flat[i * per:(i + 1) * per]
            out[a] = ModelDetails(
                instances=instances[a],
                placement=self._checked(self.k.placement(a), reason, None),
                waiting_requests=int(self._checked(self.k.queue(a), waiting, 0)),
                stats=self._timings(a, self._checked(self.k.stats(a), stats, {}),
                                    [self._checked(self.k.samples(a, k), s, [])
                                     for k, s in zip(TIMING_KINDS, samples, strict=True)]))
        return out

    async def check_records(self, worker_ids: Iterable[str]) -> None:
        """Read what the status view does not show (assignments, ledgers, version counters)
        so that their bad records are reported too."""
        ids = list(worker_ids)
        await self.assignments(ids)
        await self.ledgers(ids)
        counters = [self.k.models_version, self.k.routes_version]
        for key, raw in zip(counters, await self.r.mget(counters), strict=True):
            try:
                parse_counter(key, cast(str | None, raw))
            except BadRecord as e:
                self._skip(e)
