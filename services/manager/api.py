"""Manager HTTP API: worker registration and heartbeats (the seed's API), health."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.manager.scheduler import Scheduler
from shared.errors import Conflict, NotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.models import Heartbeat, WorkerRegistration, is_valid_name
from shared.settings import ManagerSettings
from shared.store import Store


def build_routes(
    store: Store, settings: ManagerSettings, scheduler: Scheduler, insecure: bool
) -> APIRouter:
    internal = Depends(bearer_guard(settings.internal_token))
    api = APIRouter()
    # Worker records are small (shared.models bounds them); a larger body is refused (413)
    # before it is parsed.
    limit = settings.worker_record_max_bytes

    @api.get("/health")
    async def health() -> Response:
        return json_response({
            "status": "ok",
            "manager_id": settings.manager_id,
            "leader": scheduler.state.leader,
            "epoch": scheduler.state.epoch,
            "passes": scheduler.state.passes,
            "insecure": insecure,
        })

    @api.post("/workers/register", dependencies=[internal])
    async def register(request: Request) -> Response:
        reg = await parse_body(request, WorkerRegistration, limit)
        if not await store.register_worker(reg, settings.heartbeat_ttl_s):
            raise Conflict(f"worker '{reg.worker_id}' is registered and alive at another URL; "
                           "a worker that moved registers again once its heartbeat lapses",
                           param="worker_id")
        return json_response({
            "ok": True,
            "heartbeat_interval_s": settings.heartbeat_interval_s,
            "heartbeat_ttl_s": settings.heartbeat_ttl_s,
        })

    @api.post("/workers/{worker_id}/heartbeat", dependencies=[internal])
    async def heartbeat(worker_id: str, request: Request) -> Response:
        hb = await parse_body(request, Heartbeat, limit)
        known = None
        if is_valid_name(worker_id):
            known = await store.heartbeat(worker_id, hb, settings.heartbeat_ttl_s)
        if known is None:
            raise NotFound(f"worker '{clip(worker_id)}' is not registered; register first")
        return json_response({"ok": True, "revived": not known})

    @api.get("/workers", dependencies=[internal])
    async def workers() -> Response:
        return json_response({"workers": [w.model_dump() for w in await store.list_workers()]})

    return api
