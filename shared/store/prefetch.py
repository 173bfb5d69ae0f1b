"""Prefetch of model weights: operators' requests per worker, and each worker's progress."""

from __future__ import annotations

import time
from typing import Any

import orjson

from shared.records import BadRecord
from shared.store.base import StoreBase


class PrefetchStore(StoreBase):
    async def request_prefetch(self, alias: str, model_name: str, workers: list[str]) -> None:
        """Ask each of ``workers`` to download ``model_name``; their progress starts queued."""
        now = time.time()
        req = orjson.dumps({"model_name": model_name, "requested_at": now}).decode()
        queued = orjson.dumps({"state": "queued", "model_name": model_name, "done_mb": 0,
                               "error": "", "updated_at": now}).decode()
        async with self.r.pipeline(transaction=True) as pipe:
            for w in workers:
                pipe.hset(self.k.prefetch(w), alias, req)
                pipe.hset(self.k.prefetch_status(alias), w, queued)
            await pipe.execute()

    async def prefetch_requests(self, worker_id: str) -> dict[str, str]:
        """alias -> model name of the prefetches asked of this worker."""
        key = self.k.prefetch(worker_id)
        out = {}
        for alias, raw in (await self._hashes([key]))[0].items():
            try:
                out[alias] = str(orjson.loads(raw)["model_name"])
            except (orjson.JSONDecodeError, KeyError, TypeError):
                self._skip(BadRecord(key, "not a prefetch request", alias))
        return out

    async def set_prefetch_status(self, alias: str, worker_id: str, status: dict[str, Any],
                                  finished: bool = False) -> None:
        """Progress of one prefetch; ``finished`` (done or failed) also drops the request."""
        value = orjson.dumps(status | {"updated_at": time.time()}).decode()
        async with self.r.pipeline(transaction=True) as pipe:
            pipe.hset(self.k.prefetch_status(alias), worker_id, value)
            if finished:
                pipe.hdel(self.k.prefetch(worker_id), alias)
            await pipe.execute()

    async def prefetch_status(self, aliases: list[str]) -> dict[str, dict[str, Any]]:
        """alias -> worker -> progress, for the aliases that have any."""
        keys = [self.k.prefetch_status(a) for a in aliases]
        out: dict[str, dict[str, Any]] = {}
        for alias, key, raw in zip(aliases, keys, await self._hashes(keys), strict=True):
            for worker, value in raw.items():
                try:
                    out.setdefault(alias, {})[worker] = orjson.loads(value)
                except orjson.JSONDecodeError:
                    self._skip(BadRecord(key, "not JSON", worker))
        return out
