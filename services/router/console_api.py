"""What the operators' console (the ``svllm`` CLI and the web page) needs beyond the admin API:
applying a models file, reading an engine's log through its worker, and the page itself.

The page at ``/console`` is static and public (it holds no data); every API call it makes
carries the admin token, and the routes here sit behind the same guard as ``/admin/*``.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import httpx
from fastapi import APIRouter, Depends, FastAPI, Query, Request
from pydantic import Field
from starlette.responses import RedirectResponse, Response
from starlette.staticfiles import StaticFiles

from services.router.routes import RouteTable
from shared import models_file
from shared.engine_policy import Sandbox
from shared.errors import ApiError, BadRequest, ModelNotFound, NotFound, UpstreamError, clip
from shared.http import auth_headers, bearer_guard, json_response, parse_body
from shared.models import Strict, is_valid_name
from shared.settings import RouterSettings
from shared.store import Store

STATIC_DIR = Path(__file__).resolve().parent / "static"


class ApplyRequest(Strict):
    """Body of ``POST /admin/models/apply``: a models file's entries, as JSON."""

    models: list[Any] = Field(default_factory=list)
    # LoRA adapters; absent (None): the pool's adapters are left alone.
    adapters: list[Any] | None = None
    prune: bool = False
    dry_run: bool = False


def _pick_instance(instances: dict[str, dict[str, str]], worker: str | None) -> str | None:
    if worker is not None:
        return worker
    by_state = sorted(instances, key=lambda w: instances[w].get("state") != "RUNNING")
    return by_state[0] if by_state else None


async def _worker_log(url: str, token: str | None, alias: str,
                      params: dict[str, int]) -> dict[str, Any]:
    try:
        async with httpx.AsyncClient(timeout=10.0) as client:
            r = await client.get(f"{url}/instances/{alias}/log", params=params,
                                 headers=auth_headers(token))
    except httpx.HTTPError as e:
        raise UpstreamError(f"worker at {url} did not answer: {e!r}") from None
    if r.status_code != 200:
        try:
            message = str(r.json()["error"]["message"])
        except (ValueError, KeyError, TypeError):
            message = f"worker answered {r.status_code}"
        err = ApiError(message)
        err.status, err.type, err.code = r.status_code, "invalid_request_error", "worker_error"
        raise err
    return dict(r.json())


def build_routes(store: Store, settings: RouterSettings, table: RouteTable) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])

    @api.post("/models/apply")
    async def apply(request: Request) -> Response:
        req = await parse_body(request, ApplyRequest, settings.max_body_bytes)
        sandbox = Sandbox.from_settings(settings.allow_trust_remote_code, settings.model_roots)
        doc = models_file.Document(req.models, req.adapters)
        try:
            desired, adapters = await models_file.plan(store, doc, settings.default_engine,
                                                       sandbox, req.prune)
        except models_file.SpecError as e:
            raise BadRequest(e.message, param=e.param) from None
        diff = await models_file.apply(store, desired, prune=req.prune, dry_run=req.dry_run,
                                       adapters=adapters)
        if not req.dry_run:
            await table.refresh()
        return json_response(diff.as_dict() | {"dry_run": req.dry_run, "prune": req.prune})

    @api.get("/models/{alias}/log")
    async def log(alias: str, worker: str | None = None,
                  lines: int = Query(100, ge=1, le=5000),
                  since: int | None = Query(None, ge=0)) -> Response:
        if not is_valid_name(alias) or await store.get_model(alias) is None:
            raise ModelNotFound(f"model '{clip(alias)}' is not registered")
        if worker is not None and not is_valid_name(worker):
            raise BadRequest(f"invalid worker id '{clip(worker)}'", param="worker")
        chosen = _pick_instance(await store.instances_of(alias), worker)
        if chosen is None:
            raise NotFound(f"model '{alias}' has no instance: no engine log to read "
                           "(name a worker to read an earlier one's log)")
        urls = {w.worker_id: w.url for w in await store.list_workers()}
        if chosen not in urls:
            raise NotFound(f"unknown worker '{chosen}'", param="worker")
        params = {"lines": lines} | ({"since": since} if since is not None else {})
        return json_response(
            await _worker_log(urls[chosen], settings.internal_token, alias, params))

    return api


def install(app: FastAPI, store: Store, settings: RouterSettings, table: RouteTable) -> None:
    """The console's API routes and its static page, on the router's app."""
    app.include_router(build_routes(store, settings, table))

    @app.get("/console", include_in_schema=False)
    async def console() -> Response:
        return RedirectResponse("/console/")

    app.mount("/console", StaticFiles(directory=STATIC_DIR, html=True), name="console")
