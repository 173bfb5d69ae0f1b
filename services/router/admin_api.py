"""Admin REST: register, list and delete models; see workers and the whole pool's status."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.routes import RouteTable
from shared.errors import BadRequest, ModelNotFound
from shared.http import bearer_guard, json_response, parse_body
from shared.models import RegisterModelRequest, is_valid_name
from shared.settings import RouterSettings
from shared.store import Store, StoredModel

logger = logging.getLogger(__name__)


async def _model_view(store: Store, m: StoredModel) -> dict[str, Any]:
    instances = await store.instances_of(m.spec.alias)
    return {
        "alias": m.spec.alias,
        "engine": m.spec.engine,
        "model_name": m.spec.model_name,
        "spec": m.spec.model_dump(),
        "created_at": m.created_at,
        "held": m.hold is not None,
        "placement": await store.placement_reason(m.spec.alias),
        "instances": [{"worker_id": w} | rec for w, rec in instances.items()],
    }


def build_routes(store: Store, settings: RouterSettings, table: RouteTable) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])

    @api.post("/models/register")
    async def register(request: Request) -> Response:
        req = await parse_body(request, RegisterModelRequest, settings.max_body_bytes)
        try:
            spec = req.to_spec(settings.default_engine)
        except ValueError as e:
            raise BadRequest(str(e).split("\n")[-1].strip() or "invalid model spec") from None
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

    @api.get("/workers")
    async def workers() -> Response:
        return json_response({"workers": [w.model_dump() for w in await store.list_workers()]})

    @api.get("/status")
    async def status() -> Response:
        return json_response({
            "scheduler": {"lease": await store.lease_holder()},
            "workers": [w.model_dump() for w in await store.list_workers()],
            "models": [await _model_view(store, m) for m in await store.list_models()],
        })

    return api
