"""Manager HTTP API: worker registration and heartbeats (the seed's API), health."""

from __future__ import annotations

import time

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.manager.scheduler import Scheduler
from shared.errors import Conflict, NotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.models import Heartbeat, WorkerRegistration, is_valid_name
from shared.pace import pool_pace
from shared.settings import ManagerSettings
from shared.store import Store

# How long the manager API's count of the pool (for pacing heartbeats) is reused.
COUNT_TTL_S = 5.0


def build_routes(
    store: Store, settings: ManagerSettings, scheduler: Scheduler, insecure: bool
) -> APIRouter:
    internal = Depends(bearer_guard(settings.internal_token))
    api = APIRouter()
    # Worker records are small (shared.models bounds them); a larger body is refused (413)
    # before it is parsed.
    limit = settings.worker_record_max_bytes
    # The pool's size, to pace the TTLs written here (shared/pace.py): read again at most
    # every COUNT_TTL_S, not at every beat.
    counted: list[float] = [0.0, -COUNT_TTL_S]  # [workers, monotonic time read]

    async def pace() -> float:
        if time.monotonic() - counted[1] >= COUNT_TTL_S:
            counted[:] = [await store.worker_count(), time.monotonic()]
        return pool_pace(int(counted[0]), settings)

    @api.get("/health")
    async def health() -> Response:
        return json_response({
            "status": "ok",
            "manager_id": settings.manager_id,
            "leader": scheduler.state.leader,
            # What the scheduler's waits are paced by (1: heartbeats as configured).
            "heartbeat_pace": scheduler.heartbeat_pace,
            "epoch": scheduler.state.epoch,
            "passes": scheduler.state.passes,
            "insecure": insecure,
        })

    @api.post("/workers/register", dependencies=[internal])
    async def register(request: Request) -> Response:
        reg = await parse_body(request, WorkerRegistration, limit)
        paced = await pace()
        if not await store.register_worker(reg, settings.heartbeat_ttl_s * paced):
            raise Conflict(f"worker '{reg.worker_id}' is registered and alive at another URL; "
                           "a worker that moved registers again once its heartbeat lapses",
                           param="worker_id")
        return json_response({
            "ok": True,
            "heartbeat_interval_s": settings.heartbeat_interval_s * paced,
            "heartbeat_ttl_s": settings.heartbeat_ttl_s * paced,
            "pace": paced,
        })

    @api.post("/workers/{worker_id}/heartbeat", dependencies=[internal])
    async def heartbeat(worker_id: str, request: Request) -> Response:
        hb = await parse_body(request, Heartbeat, limit)
        known, paced = None, 1.0
        if is_valid_name(worker_id):
            paced = await pace()
            known = await store.heartbeat(worker_id, hb, settings.heartbeat_ttl_s * paced)
        if known is None:
            raise NotFound(f"worker '{clip(worker_id)}' is not registered; register first")
        # The worker waits interval x pace for its next beat: within the TTL written here.
        return json_response({"ok": True, "revived": not known, "pace": paced})

    @api.get("/workers", dependencies=[internal])
    async def workers() -> Response:
        return json_response({"workers": [w.model_dump() for w in await store.list_workers()]})

    return api
