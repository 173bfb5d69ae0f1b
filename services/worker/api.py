"""Worker HTTP API: health, info, manual placement, and the proxy to local engines."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Query, Request
from starlette.responses import Response

from services.worker import enginelog, proxy
from services.worker.agent import Agent
from services.worker.lora import LoraManager
from shared.errors import BadRequest, ModelNotFound, NotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.models import ManualStartRequest, is_valid_name
from shared.settings import WorkerSettings
from shared.store import Intents, Store
from shared.tracing import Tracing
from shared.wire import Pool


def build_routes(
    store: Store, settings: WorkerSettings, agent: Agent, upstream: Pool, insecure: bool,
    loras: LoraManager | None = None,
    tracing: Tracing | None = None,
) -> APIRouter:
    admin = Depends(bearer_guard(settings.admin_token))
    # Ports and pids of the engines: for the pool's services and operators, not for anyone.
    either = Depends(bearer_guard(settings.admin_token, settings.internal_token))
    sup = agent.supervisor
    api = APIRouter()

    @api.get("/health")
    async def health() -> Response:
        return json_response({"status": "ok", "worker_id": settings.worker_id,
                              "insecure": insecure})

    @api.get("/info", dependencies=[either])
    async def info() -> Response:
        reg = agent.registration()
        instances = [
            {k: v for k, v in i.record().items() if k != "log_tail"} | {"alias": i.alias}
            for i in sup.instances.values()
        ]
        return json_response(reg.model_dump() | {"instances": instances})

    @api.post("/instances/start", dependencies=[admin], status_code=202)
    async def start(request: Request) -> Response:
        body = await parse_body(request, ManualStartRequest, settings.max_body_bytes)
        model = await store.get_model(body.alias)
        if model is None:
            raise ModelNotFound(f"model '{clip(body.alias)}' is not registered", param="alias")
        if model.spec.engine not in sup.drivers:
            raise BadRequest(
                f"this worker cannot run engine '{model.spec.engine}' "
                f"(it has {', '.join(sorted(sup.drivers))})", param="alias")
        # A request the scheduler carries out (it alone writes assignments, and reserves the
        # GPU memory as for any placement): 202, then the placement or its refusal shows in
        # /admin/status.
        await store.request_manual_start(body.alias, settings.worker_id)
        return json_response({"alias": body.alias, "worker_id": settings.worker_id,
                              "status": "requested"}, 202)

    @api.post("/instances/{alias}/stop", dependencies=[admin], status_code=202)
    async def stop(alias: str) -> Response:
        if not is_valid_name(alias) or await store.get_model(alias) is None:
            raise ModelNotFound(f"model '{clip(alias)}' is not registered")
        manual = (await store.intents([alias])).get(alias, Intents()).manual
        if (alias not in await store.worker_assignments(settings.worker_id)
                and settings.worker_id not in manual):
            raise NotFound(f"model '{alias}' is not assigned to this worker")
        await store.request_manual_stop(alias, settings.worker_id)
        return json_response({"alias": alias, "worker_id": settings.worker_id,
                              "status": "stopping"}, 202)

    check_internal = bearer_guard(settings.internal_token)

    @api.get("/instances/{alias}/log", dependencies=[Depends(check_internal)])
    async def log(alias: str, lines: int = Query(100, ge=1, le=5000),
                  since: int | None = Query(None, ge=0)) -> Response:
        # Internal token: routers forward the operators' reads (GET /admin/models/{alias}/log).
        path = enginelog.log_path(settings.state_dir, settings.worker_id, alias)
        return json_response(enginelog.read(path, alias, lines, since)
                             | {"worker_id": settings.worker_id})

    async def proxied(request: Request) -> Response:
        # A plain Starlette route: the hot path skips FastAPI's dependency machinery.
        proxy.tag(request)  # before anything can fail: every answer carries the id
        await check_internal(request)
        params = request.path_params
        return await proxy.forward(request, params["alias"], params["path"], sup, upstream,
                                   settings.max_body_bytes, loras, tracing,
                                   settings.max_audio_bytes)

    api.add_route("/proxy/{alias}/{path:path}", proxied, methods=["GET", "POST"])

    return api
