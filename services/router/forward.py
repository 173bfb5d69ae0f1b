"""Forwarding one OpenAI request to a replica, failing over before any byte is sent."""

from __future__ import annotations

import itertools
import logging
from collections import Counter

import httpx
from starlette.responses import Response

from services.router.balancer import order_replicas
from services.router.routes import RouteTable
from shared.errors import ApiError, NoCapacity, UpstreamError
from shared.http import auth_headers, open_upstream, relay
from shared.store import Store

logger = logging.getLogger(__name__)

# A worker answering these has not started on the request: another replica may serve it.
_RETRYABLE = (502, 503)


class Forwarder:
    def __init__(
        self, table: RouteTable, store: Store, client: httpx.AsyncClient,
        internal_token: str | None, retry_after_s: int,
    ) -> None:
        self.table = table
        self.store = store
        self.client = client
        self.retry_after_s = retry_after_s
        self.inflight: Counter[str] = Counter()
        self._turn = itertools.count()
        self._auth = auth_headers(internal_token)

    async def forward(self, alias: str, path: str, body: bytes, request_id: str) -> Response:
        replicas = self.table.replicas(alias)
        if not replicas:
            raise await self._why_no_replica(alias)
        order = order_replicas(sorted(replicas), self.inflight, next(self._turn))
        headers = {"content-type": "application/json", "x-request-id": request_id, **self._auth}
        last: ApiError | None = None
        for i, worker in enumerate(order):
            url = f"{replicas[worker]}/proxy/{alias}/{path}"
            self.inflight[worker] += 1
            try:
                upstream = await open_upstream(self.client, "POST", url, body, headers)
            except UpstreamError as e:
                self._done(worker)
                logger.warning("replica %s of %s unreachable: %s", worker, alias, e.message)
                last = e
                continue
            except BaseException:
                self._done(worker)
                raise
            if upstream.status_code in _RETRYABLE and i + 1 < len(order):
                await upstream.aclose()
                self._done(worker)
                continue
            return relay(upstream, on_close=lambda w=worker: self._done(w))  # type: ignore[misc]
        raise last or NoCapacity(f"no replica of '{alias}' could take the request",
                                 retry_after_s=self.retry_after_s)

    def _done(self, worker: str) -> None:
        self.inflight[worker] -= 1
        if self.inflight[worker] <= 0:
            del self.inflight[worker]

    async def _why_no_replica(self, alias: str) -> ApiError:
        """An explanation for a model with no serving replica (off the hot path)."""
        detail = ""
        try:
            model = await self.store.get_model(alias)
            instances = await self.store.instances_of(alias)
            reason = await self.store.placement_reason(alias)
            if model is not None and model.hold:
                detail = "it was stopped manually; start it on a worker to serve it again"
            elif instances:
                detail = "; ".join(
                    f"{w}: {i.get('state')}" + (f" ({i['error']})" if i.get("error") else "")
                    for w, i in instances.items())
            elif reason:
                detail = f"not placed: {reason}"
            else:
                detail = "waiting for placement"
        except Exception:
            detail = "state store unreachable"
        return NoCapacity(f"model '{alias}' has no serving replica yet ({detail})",
                          retry_after_s=self.retry_after_s)
