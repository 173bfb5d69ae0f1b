"""Admin REST for API keys, tenant limits and usage (docs/keys.md)."""

from __future__ import annotations

import time
from collections import defaultdict
from collections.abc import Awaitable, Callable
from typing import Any

from fastapi import APIRouter, Depends, Request
from starlette.responses import Response

from services.router.keyring import KeyRing
from shared.apikeys import (
    CreateKey,
    KeyLimits,
    KeyRecord,
    TenantLimits,
    UpdateKey,
    hash_secret,
    new_key_id,
    new_secret,
)
from shared.errors import BadRequest, NotFound, clip
from shared.http import bearer_guard, json_response, parse_body
from shared.settings import RouterSettings
from shared.store import Store
from shared.store.apikeys import COUNTERS, USAGE_MAX_HOURS

_TENANT_OK = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789._-")


def _created(rec: KeyRecord, secret: str) -> dict[str, Any]:
    # The only answer that ever carries the secret.
    return rec.view() | {"key": secret}


def _give(rec: KeyRecord, secret: str) -> None:
    """``secret`` becomes the key's: only its hash (and last four characters) are kept."""
    rec.secret_hash = hash_secret(secret.encode())
    rec.hint = secret[-4:]


def _model_limits(req: KeyLimits) -> dict[str, dict[str, int]]:
    try:
        return req.model_limits_dict()
    except ValueError as e:
        raise BadRequest(f"model_limits: {e}", param="model_limits") from None


def _hour_arg(value: str | None, default: float, name: str) -> int:
    if value is None:
        return int(default) // 3600 * 3600
    try:
        return int(float(value)) // 3600 * 3600
    except (ValueError, OverflowError):  # OverflowError: inf
        raise BadRequest(f"{name}: a unix time in seconds is required", param=name) from None


def build_routes(store: Store, settings: RouterSettings, ring: KeyRing) -> APIRouter:
    api = APIRouter(prefix="/admin", dependencies=[Depends(bearer_guard(settings.admin_token))])
    limit = settings.max_body_bytes

    async def existing(key_id: str) -> KeyRecord:
        rec = await store.get_key(key_id) if key_id.isascii() and len(key_id) < 64 else None
        if rec is None:
            raise NotFound(f"API key '{clip(key_id)}' does not exist", code="key_not_found")
        return rec

    async def changed() -> None:
        await ring.reload()  # this router at once; the others on the hint

    @api.post("/keys")
    async def create(request: Request) -> Response:
        req = await parse_body(request, CreateKey, limit)
        now = time.time()
        rec = KeyRecord(
            new_key_id(), req.name, req.tenant, "", list(req.models), req.rpm, req.tpm,
            req.max_concurrent, req.priority, req.expires_at, now, now,
            model_limits=_model_limits(req))
        secret = new_secret()
        _give(rec, secret)
        await store.save_key(rec)
        await changed()
        return json_response(_created(rec, secret), 201)

    @api.get("/keys")
    async def list_keys(tenant: str | None = None) -> Response:
        keys, _, _ = await store.all_keys()
        views = [k.view() for k in sorted(keys, key=lambda k: (k.tenant, k.created_at))
                 if tenant is None or k.tenant == tenant]
        return json_response({"keys": views})

    @api.get("/keys/{key_id}")
    async def get_key(key_id: str) -> Response:
        return json_response((await existing(key_id)).view())

    async def updated(key_id: str, change: Callable[[KeyRecord], None]) -> KeyRecord:
        """The key after ``change``, read and written in one transaction (store.update_key)."""
        def stamped(rec: KeyRecord) -> None:
            change(rec)
            rec.updated_at = time.time()

        rec = await store.update_key((await existing(key_id)).tenant, key_id, stamped)
        if rec is None:
            raise NotFound(f"API key '{clip(key_id)}' does not exist", code="key_not_found")
        await changed()
        return rec

    @api.patch("/keys/{key_id}")
    async def update(key_id: str, request: Request) -> Response:
        req = await parse_body(request, UpdateKey, limit)
        model_limits = _model_limits(req)
        fields = req.model_dump(exclude_unset=True)
        for name, value in fields.items():
            if value is None and name in ("name", "models", "priority"):
                raise BadRequest(f"{name}: may not be null", param=name)

        def change(rec: KeyRecord) -> None:
            for name, value in fields.items():
                setattr(rec, name, model_limits if name == "model_limits" else value)

        return json_response((await updated(key_id, change)).view())

    @api.post("/keys/{key_id}/rotate")
    async def rotate(key_id: str) -> Response:
        secret = new_secret()
        return json_response(_created(await updated(key_id, lambda rec: _give(rec, secret)),
                                      secret))

    @api.delete("/keys/{key_id}")
    async def revoke(key_id: str) -> Response:
        rec = await existing(key_id)
        await store.delete_key(rec)
        await changed()
        return json_response({"key_id": key_id, "revoked": True})

    _tenant_routes(api, store, changed, limit)
    _usage_route(api, store)
    return api


def _tenant_routes(api: APIRouter, store: Store, changed: Callable[[], Awaitable[None]],
                   limit: int) -> None:
    @api.get("/tenants")
    async def tenants() -> Response:
        # Every tenant ever given a key or a limit: its shared limits and how many keys it
        # has (the console's keys page; PUT below sets the limits).
        keys, limits, _ = await store.all_keys()
        count: dict[str, int] = defaultdict(int)
        for k in keys:
            count[k.tenant] += 1
        names = sorted(set(await store.tenant_names()) | set(count))
        return json_response({"tenants": [
            {"tenant": t, "rpm": limits.get(t, {}).get("rpm"),
             "tpm": limits.get(t, {}).get("tpm"), "keys": count[t]} for t in names]})

    @api.put("/tenants/{tenant}/limits")
    async def tenant_limits(tenant: str, request: Request) -> Response:
        if not tenant or len(tenant) > 64 or not set(tenant) <= _TENANT_OK:
            raise BadRequest("tenant: 1-64 letters, digits, '.', '_' or '-'", param="tenant")
        req = await parse_body(request, TenantLimits, limit)
        await store.set_tenant_limits(tenant, req.model_dump())
        await changed()
        return json_response({"tenant": tenant} | req.model_dump())


def _usage_route(api: APIRouter, store: Store) -> None:
    @api.get("/usage")
    async def usage(request: Request, key: str | None = None, tenant: str | None = None,
                    model: str | None = None) -> Response:
        now = time.time()
        q = request.query_params
        first = _hour_arg(q.get("from"), now - 24 * 3600, "from")
        last = _hour_arg(q.get("to"), now, "to")
        if last < first:
            raise BadRequest("to: must not be before from", param="to")
        # Counted before the list is made: a far-away "from" must not allocate it.
        if (last - first) // 3600 + 1 > USAGE_MAX_HOURS:
            raise BadRequest(f"from/to: at most {USAGE_MAX_HOURS} hours at a time",
                             param="from")
        hours = list(range(first, last + 1, 3600))
        tenants = [tenant] if tenant else await store.tenant_names()
        rows = await store.usage_rows(tenants, hours)
        return json_response(_usage_view(rows, key, model, first, last))


def _usage_view(rows: list[tuple[str, int, dict[str, str]]], key: str | None,
                model: str | None, first: int, last: int) -> dict[str, Any]:
    per: dict[tuple[str, str, str, int], dict[str, int]] = defaultdict(
        lambda: dict.fromkeys(COUNTERS, 0))
    for tenant, hour, fields in rows:
        for f, v in fields.items():
            key_id, _, rest = f.partition("|")
            alias, _, counter = rest.rpartition("|")
            if counter not in COUNTERS or not v.lstrip("-").isdigit():
                continue
            if (key and key_id != key) or (model and alias != model):
                continue
            per[(tenant, key_id, alias, hour)][counter] += int(v)
    total = dict.fromkeys(COUNTERS, 0)
    items = []
    for (tenant, key_id, alias, hour), counts in sorted(per.items()):
        items.append({"tenant": tenant, "key_id": key_id, "model": alias, "hour": hour}
                     | counts)
        for c in COUNTERS:
            total[c] += counts[c]
    return {"from": first, "to": last, "total": total, "rows": items}
