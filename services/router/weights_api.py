"""Admin REST for weights locality: ``POST /admin/models/{alias}/prefetch`` asks workers to
download a model's weights ahead of time (services/worker/prefetch.py); progress and the
reason of a failure show in ``/admin/status`` under the model's ``prefetch``."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from shared.engine_policy import is_local_path
from shared.errors import BadRequest, ModelNotFound, NotFound, clip
from shared.http import bearer_guard, json_response, parse_as, parse_object, read_body
from shared.models import PrefetchRequest, WorkerView, is_valid_name
from shared.settings import RouterSettings
from shared.store import Store, StoredModel


def _targets(model: StoredModel, asked: list[str] | None, workers: list[WorkerView]
             ) -> list[str]:
    """The workers to download to: those asked (each must be registered and alive), else
    every live worker that can run the model's engine and lacks its weights."""
    spec = model.spec
    if asked is None:
        return [w.worker_id for w in workers if w.alive and spec.engine in w.engines
                and not w.has_weights(spec.model_name)]
    known = {w.worker_id: w for w in workers}
    for wid in asked:
        w = known.get(wid)
        if w is None:
            raise NotFound(f"worker '{clip(wid)}' is not registered", param="workers")
        if not w.alive:
            raise BadRequest(f"worker '{wid}' is not alive", param="workers")
    return sorted(set(asked))


def build_routes(store: Store, settings: RouterSettings) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])

    @api.post("/models/{alias}/prefetch", status_code=202)
    async def prefetch(alias: str, request: Request) -> Response:
        body = await read_body(request, settings.max_body_bytes)
        req = parse_as(PrefetchRequest, parse_object(body)) if body.strip() else \
            PrefetchRequest()
        model = await store.get_model(alias) if is_valid_name(alias) else None
        if model is None:
            raise ModelNotFound(f"model '{clip(alias)}' is not registered")
        name = model.spec.model_name
        if is_local_path(name) or model.spec.engine == "llamacpp":
            raise BadRequest(f"model '{alias}' is a local path ({name}): there is nothing to "
                             "download; copy it under MODEL_ROOTS on each worker", param="alias")
        targets = _targets(model, req.workers, await store.list_workers())
        if targets:
            await store.request_prefetch(alias, name, targets)
        return json_response({"alias": alias, "model_name": name, "workers": targets}, 202)

    return api
