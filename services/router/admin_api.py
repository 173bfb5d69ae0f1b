"""Admin REST: register, list and delete models; see workers and the whole pool's status."""

from __future__ import annotations

import logging
import time
from typing import Any

import orjson
from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.admission import Gate
from services.router.breaker import Breaker
from services.router.keyring import KeyRing
from services.router.routes import RouteTable
from shared import models_file
from shared.engine_policy import Sandbox
from shared.errors import BadRequest, Conflict, ModelNotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.models import ModelSpec, RegisterModelRequest, Reservation, is_valid_name
from shared.settings import RouterSettings
from shared.store import ModelDetails, Store, StoredModel

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


def _model_view(m: StoredModel, d: ModelDetails) -> dict[str, Any]:
    return {
        "alias": m.spec.alias,
        "engine": m.spec.engine,
        "model_name": m.spec.model_name,
        "state": _summary(m, [i.get("state", "") for i in d.instances.values()]),
        # As stored (the JSON registered), embedded without serialising it again.
        "spec": orjson.Fragment(m.spec_json) if m.spec_json else m.spec.model_dump(),
        "created_at": m.created_at,
        "held": m.hold is not None,
        "placement": d.placement,
        "waiting_requests": d.waiting_requests,
        "stats": d.stats,
        "instances": [{"worker_id": w} | rec for w, rec in d.instances.items()],
    }


async def _model_views(store: Store) -> list[dict[str, Any]]:
    """Every registered model's view, in a fixed number of round trips."""
    return [_model_view(m, d) for m, d in await store.model_views()]


async def _validated_spec(req: RegisterModelRequest, store: Store, settings: RouterSettings,
                          sandbox: Sandbox) -> ModelSpec:
    """The spec of a registration, validated as a models-file entry is (shared.models_file):
    the operator's sandbox and (vLLM) the live workers' vLLM flags included; every refusal is
    a 400 naming the field and the reason."""
    try:
        spec = models_file.to_spec(req.model_dump(), settings.default_engine, sandbox)
        await models_file.check_flags([spec], store, name_alias=False)
    except models_file.SpecError as e:
        raise BadRequest(e.message, param=e.param) from None
    return spec


def reserved_by_gpu(ledgers: dict[str, dict[str, Reservation]]) -> dict[str, dict[str, int]]:
    """worker -> GPU index (as a JSON key) -> MB reserved there by the ledger."""
    out: dict[str, dict[str, int]] = {}
    for worker, entries in ledgers.items():
        per_gpu = out.setdefault(worker, {})
        for r in entries.values():
            for g in r.gpus:
                per_gpu[str(g)] = per_gpu.get(str(g), 0) + r.mb_per_gpu
    return out


def build_routes(
    store: Store, settings: RouterSettings, table: RouteTable, breaker: Breaker,
    security: dict[str, Any], ring: KeyRing, admission: Gate | None = None,
) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])
    sandbox = Sandbox.from_settings(settings.allow_trust_remote_code, settings.model_roots)

    @api.post("/models/register")
    async def register(request: Request) -> Response:
        req = await parse_body(request, RegisterModelRequest, settings.max_body_bytes)
        spec = await _validated_spec(req, store, settings, sandbox)
        if await store.is_adapter(spec.alias):
            raise Conflict(f"'{spec.alias}' is a registered LoRA adapter", param="alias")
        if req.engine is None:
            logger.info("model %s uses the default engine '%s' (DEFAULT_ENGINE)",
                        spec.alias, spec.engine)
        stored = await store.register(spec)
        created = stored is not None
        if stored is not None:
            await table.learn(stored)  # no reload: the next refresh re-reads just this one
        else:
            await table.refresh()
        return json_response({"alias": spec.alias, "created": created, "spec": spec.model_dump()},
                             201 if created else 200)

    @api.get("/models")
    async def models() -> Response:
        return json_response({"models": await _model_views(store)})

    @api.delete("/models/{alias}")
    async def delete(alias: str) -> Response:
        if not is_valid_name(alias) or not await store.delete_model(alias):
            raise ModelNotFound(f"model '{clip(alias)}' is not registered")
        await table.forget(alias)
        return json_response({"alias": alias, "deleted": True})

    async def registered(alias: str) -> StoredModel:
        model = await store.get_model(alias) if is_valid_name(alias) else None
        if model is None:
            raise ModelNotFound(f"model '{clip(alias)}' is not registered")
        return model

    @api.post("/models/{alias}/wake", status_code=202)
    async def wake(alias: str) -> Response:
        model = await registered(alias)
        # Requests the scheduler carries out: it alone writes assignments (docs/redis.md).
        await store.request_wake(alias, min(10.0, model.spec.cold_start_timeout_s))
        await table.refresh()
        return json_response({"alias": alias, "status": "waking"}, 202)

    @api.post("/models/{alias}/sleep", status_code=202)
    async def sleep(alias: str) -> Response:
        model = await registered(alias)
        if not model.spec.sleep_mode:
            raise BadRequest(f"model '{alias}' has no sleep policy: register it with "
                             "idle_sleep_s so its engines start with sleep mode", param="alias")
        if "running" not in (await store.targets_of(alias)).values():
            raise Conflict(f"model '{alias}' has no awake instance to put to sleep")
        await store.request_sleep(alias)
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
        began = time.monotonic()
        workers = await store.list_workers()
        models = await _model_views(store)
        # Weights prefetches in progress or ended: worker -> state, MB done, failure reason.
        prefetch = await store.prefetch_status([m["alias"] for m in models])
        for m in models:
            m["prefetch"] = prefetch.get(m["alias"], {})
        # Records this view does not show are read too, so that a bad one is named below.
        # ... and the ledgers it reads give the reserved memory shown per GPU.
        reserved = reserved_by_gpu(await store.check_records(await store.worker_ids()))
        return json_response({
            # The /v1 auth in effect now; "open" means anyone who reaches the port.
            "security": security | {"openai_api": ring.mode,
                                    "openai_api_open": ring.mode == "open",
                                    "api_keys": len(ring.by_hash)},
            "scheduler": {"lease": await store.lease_holder()},
            # This router's own view: replicas (model, worker) its circuit breaker ejected,
            # with the seconds left.
            # queues: per model at its max_inflight here, slots taken, slots and queued.
            "router": {"id": settings.router_id,
                       "ejected": breaker.view(time.monotonic()),
                       "queues": admission.view() if admission is not None else {}},
            # gpu_reserved_mb: GPU index -> MB the ledger holds for placed models there.
            "workers": [w.model_dump() | {"gpu_reserved_mb": reserved.get(w.worker_id, {})}
                        for w in workers],
            "models": models,
            # Records that do not parse, skipped by every reader (key and what is wrong).
            "problems": store.problems.since(began),
        })

    return api
