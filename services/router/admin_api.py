"""Admin REST: register, list and delete models; see workers and the whole pool's status."""

from __future__ import annotations

import logging
import time
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.breaker import Breaker
from services.router.routes import RouteTable
from shared import models_file
from shared.errors import BadRequest, Conflict, ModelNotFound
from shared.http import bearer_guard, json_response, parse_body
from shared.models import RegisterModelRequest, is_valid_name
from shared.settings import RouterSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)


def _summary(m: StoredModel, states: list[str]) -> str:
    """One word for the model: its instances' states, or why it has none."""
    if m.hold is not None:
        return "STOPPED"
    if not states:
        return "COLD" if m.spec.min_replicas == 0 else "PENDING"
    for s in ("RUNNING", "WARMING", "STARTING", "SLEEPING", "FAILED"):
        if s in states:
            return s
    return states[0]


async def _model_view(store: Store, m: StoredModel) -> dict[str, Any]:
    alias = m.spec.alias
    instances = await store.instances_of(alias)
    return {
        "alias": alias,
        "engine": m.spec.engine,
        "model_name": m.spec.model_name,
        "state": _summary(m, [i.get("state", "") for i in instances.values()]),
        "spec": m.spec.model_dump(),
        "created_at": m.created_at,
        "held": m.hold is not None,
        "placement": await store.placement_reason(alias),
        "waiting_requests": await store.queue_length(alias),
        "stats": await store.timings(alias),
        "instances": [{"worker_id": w} | rec for w, rec in instances.items()],
    }


def build_routes(
    store: Store, settings: RouterSettings, table: RouteTable, breaker: Breaker
) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])

    @api.post("/models/register")
    async def register(request: Request) -> Response:
        req = await parse_body(request, RegisterModelRequest, settings.max_body_bytes)
        try:
            spec = models_file.to_spec(req.model_dump(), settings.default_engine)
        except models_file.SpecError as e:
            raise BadRequest(e.message, param=e.param) from None
        if req.engine is None:
            logger.info("model %s uses the default engine '%s' (DEFAULT_ENGINE)",
                        spec.alias, spec.engine)
        created = await store.register_model(spec)
        await table.refresh()
        return json_response({"alias": spec.alias, "created": created, "spec": spec.model_dump()},
                             201 if created else 200)

    @api.get("/models")
    async def models() -> Response:
        return json_response({"models": [await _model_view(store, m)
                                         for m in await store.list_models()]})

    @api.delete("/models/{alias}")
    async def delete(alias: str) -> Response:
        if not is_valid_name(alias) or not await store.delete_model(alias):
            raise ModelNotFound(f"model '{alias}' is not registered")
        await table.refresh()
        return json_response({"alias": alias, "deleted": True})

    async def registered(alias: str) -> StoredModel:
        model = await store.get_model(alias) if is_valid_name(alias) else None
        if model is None:
            raise ModelNotFound(f"model '{alias}' is not registered")
        return model

    @api.post("/models/{alias}/wake", status_code=202)
    async def wake(alias: str) -> Response:
        model = await registered(alias)
        await store.release_hold(alias)
        await store.want(alias, min(10.0, model.spec.cold_start_timeout_s))
        await store.set_target_manual(alias, "running")
        await table.refresh()
        return json_response({"alias": alias, "status": "waking"}, 202)

    @api.post("/models/{alias}/sleep", status_code=202)
    async def sleep(alias: str) -> Response:
        model = await registered(alias)
        if not model.spec.sleep_mode:
            raise BadRequest(f"model '{alias}' has no sleep policy: register it with "
                             "idle_sleep_s so its engines start with sleep mode", param="alias")
        if not await store.set_target_manual(alias, "sleeping"):
            raise Conflict(f"model '{alias}' has no awake instance to put to sleep")
        return json_response({"alias": alias, "status": "sleeping"}, 202)

    @api.post("/models/{alias}/stop", status_code=202)
    async def stop(alias: str) -> Response:
        await registered(alias)
        await store.hold_model(alias, "stopped by an operator")
        await table.refresh()
        return json_response({"alias": alias, "status": "stopping"}, 202)

    @api.get("/workers")
    async def workers() -> Response:
        return json_response({"workers": [w.model_dump() for w in await store.list_workers()]})

    @api.get("/status")
    async def status() -> Response:
        return json_response({
            "scheduler": {"lease": await store.lease_holder()},
            # This router's own view: replicas its circuit breaker ejected, seconds left.
            "router": {"id": settings.router_id,
                       "ejected": breaker.view(time.monotonic())},
            "workers": [w.model_dump() for w in await store.list_workers()],
            "models": [await _model_view(store, m) for m in await store.list_models()],
        })

    return api
