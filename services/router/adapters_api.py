"""Admin REST for LoRA adapters: register, list and delete (``/admin/adapters``).

An adapter is an alias of its own whose requests a replica of its base model answers, with
the adapter loaded there on demand (services/worker/lora.py).
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.adapters import AdapterTable
from shared.engine_policy import Sandbox, is_local_path
from shared.errors import BadRequest, ModelNotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.models import AdapterSpec, is_valid_name, lora_capacity
from shared.settings import RouterSettings
from shared.store import Store


async def _checked(spec: AdapterSpec, store: Store, sandbox: Sandbox) -> None:
    """Refusals before anything is stored: a base that is not registered (404) or that cannot
    serve adapters, and a local adapter path outside MODEL_ROOTS (400)."""
    base = await store.get_model(spec.base)
    if base is None:
        raise ModelNotFound(f"base model '{spec.base}' is not registered", param="base")
    if lora_capacity(base.spec) is None:
        raise BadRequest(f"base model '{spec.base}' was not registered with --enable-lora in "
                         "its extra_args (and --max-loras N for N adapters at once)",
                         param="base")
    if is_local_path(spec.adapter) and not sandbox.allows_path(spec.adapter):
        roots = ", ".join(sandbox.model_roots) or "unset"
        raise BadRequest(f"adapter {spec.adapter!r} is a local path outside MODEL_ROOTS "
                         f"({roots})", param="adapter")


def _view(spec: AdapterSpec, table: AdapterTable, stats: dict[str, float]) -> dict[str, Any]:
    return spec.model_dump() | {
        "loaded_on": sorted(table.holders(spec.base, spec.alias)),
        "stats": {"loads": int(stats.get("loads", 0)), "load_s": stats.get("load_s", 0.0),
                  "evictions": int(stats.get("evictions", 0))},
    }


def build_routes(store: Store, settings: RouterSettings, table: AdapterTable) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])
    sandbox = Sandbox.from_settings(settings.allow_trust_remote_code, settings.model_roots)

    @api.post("/adapters")
    async def register(request: Request) -> Response:
        spec = await parse_body(request, AdapterSpec, settings.max_body_bytes)
        await _checked(spec, store, sandbox)
        outcome = await store.register_adapter(spec)
        if outcome == "no_base":  # deleted meanwhile
            raise ModelNotFound(f"base model '{spec.base}' is not registered", param="base")
        table.learn(spec)
        created = outcome == "created"
        return json_response({"alias": spec.alias, "created": created,
                              "adapter": spec.model_dump()}, 201 if created else 200)

    @api.get("/adapters")
    async def adapters() -> Response:
        await table.refresh()
        stats = await store.adapter_stats()
        return json_response({"adapters": [_view(s, table, stats.get(a, {}))
                                           for a, s in sorted(table.adapters.items())]})

    @api.delete("/adapters/{alias}")
    async def delete(alias: str) -> Response:
        if not is_valid_name(alias) or not await store.delete_adapter(alias):
            raise ModelNotFound(f"adapter '{clip(alias)}' is not registered")
        table.forget(alias)
        return json_response({"alias": alias, "deleted": True})

    return api
