"""Prefetch of model weights: operators' requests per worker, and each worker's progress."""

from __future__ import annotations

import time
from typing import Any

import orjson

from shared.records import BadRecord
from shared.store.base import StoreBase


class PrefetchStore(StoreBase):
    async def request_prefetch(self, alias: str, model_name: str, workers: list[str]) -> None:
        """Ask each of ``workers`` to download ``model_name``; their progress starts queued.

        One transaction; on a cluster, the progress (the model's slot) first, then the
        requests (``{s}``), so a worker's progress is never overwritten by this "queued".
        Interrupted in between, "queued" shows with no request behind it until the operator
        asks again."""
        now = time.time()
        req = orjson.dumps({"model_name": model_name, "requested_at": now}).decode()
        queued = orjson.dumps({"state": "queued", "model_name": model_name, "done_mb": 0,
                               "error": "", "updated_at": now}).decode()
        progress = [(self.k.prefetch_status(alias), w, queued) for w in workers]
        requests = [(self.k.prefetch(w), alias, req) for w in workers]
        if self.cluster:
            await self._hsets(progress)
            await self._hsets(requests)
        else:
            await self._hsets(progress + requests)

    async def _hsets(self, fields: list[tuple[str, str, str]]) -> None:
        """HSET of each (key, field, value) in one transaction (keys of one slot, or any
        keys on a single Redis)."""
        if not fields:
            return
        async with self._txn(fields[0][0]) as pipe:
            for key, field, value in fields:
                pipe.hset(key, field, value)
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
        """Progress of one prefetch; ``finished`` (done or failed) also drops the request, in
        the same transaction. On a cluster the request (``{s}``) is dropped after the
        progress is written (the model's slot): interrupted in between, the worker finds the
        request again and runs it again (weights already there are done at once; a failed
        one is tried again)."""
        value = orjson.dumps(status | {"updated_at": time.time()}).decode()
        status_key, request_key = self.k.prefetch_status(alias), self.k.prefetch(worker_id)
        async with self._txn(status_key) as pipe:
            pipe.hset(status_key, worker_id, value)
            if finished and not self.cluster:
                pipe.hdel(request_key, alias)
            await pipe.execute()
        if finished and self.cluster:
            await self.r.hdel(request_key, alias)

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
