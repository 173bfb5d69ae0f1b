"""``svllm keys create|list|update|revoke|rotate``, ``svllm tenants list|limits`` and
``svllm usage``: one function per command."""

from __future__ import annotations

import sys
import time
from typing import Annotated, Any
from urllib.parse import quote

import orjson
import typer
from rich.console import Console
from rich.table import Table

from services.cli.client import Client

keys = typer.Typer(help="Create, list, change, rotate and revoke API keys.",
                   no_args_is_help=True)
tenants = typer.Typer(help="Tenants: the limits their keys share.", no_args_is_help=True)
out = Console()

JsonFlag = Annotated[bool, typer.Option("--json", help="Print the API's JSON.")]


def _client(ctx: typer.Context) -> Client:
    obj = ctx.find_root().obj
    assert isinstance(obj, Client)
    return obj


def _seg(value: str) -> str:
    """``value`` as one path segment: a key id or tenant such as ``../x`` is refused by the
    API as unknown instead of reaching another path (``.`` and ``..``, which stay as they
    are once quoted, are refused here)."""
    if value in (".", ".."):
        raise typer.BadParameter(f"{value!r} is not a key id or a tenant")
    return quote(value, safe="")


def _json(data: Any) -> None:
    sys.stdout.write(orjson.dumps(data, option=orjson.OPT_INDENT_2).decode() + "\n")


def _shown_once(made: dict[str, Any], as_json: bool) -> None:
    if as_json:
        _json(made)
        return
    out.print(f"key id: {made['key_id']}  tenant: {made['tenant']}")
    out.print(f"secret (shown once, store it now): [bold]{made['key']}[/bold]")


@keys.command("create")
def create(
    ctx: typer.Context,
    name: Annotated[str, typer.Option(help="A label for the key.")],
    tenant: Annotated[str, typer.Option(help="Whose key it is.")] = "default",
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Alias glob the key may use (repeat); default: all.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Requests at once.")] = None,
    priority: Annotated[str, typer.Option(help="high, normal or low.")] = "normal",
    expires_in: Annotated[float | None, typer.Option(help="Seconds until it expires.")] = None,
    model_limit: Annotated[list[str] | None, typer.Option(
        "--model-limit", help="Limits of the key on the models a glob matches, each model "
        "its own: GLOB=rpm:N,tpm:M (repeat).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Create a key; its secret is printed once."""
    body: dict[str, Any] = {"name": name, "tenant": tenant, "models": model or ["*"],
                            "rpm": rpm, "tpm": tpm, "max_concurrent": max_concurrent,
                            "priority": priority}
    if model_limit:
        body["model_limits"] = dict(_model_limit(m) for m in model_limit)
    if expires_in is not None:
        body["expires_at"] = time.time() + expires_in
    _shown_once(_client(ctx).post("/admin/keys", body), as_json)


def _model_limit(text: str) -> tuple[str, dict[str, int]]:
    """``GLOB=rpm:N,tpm:M`` -> (glob, {"rpm": N, "tpm": M}); the API checks the values."""
    glob, sep, spec = text.partition("=")
    limits: dict[str, int] = {}
    for part in spec.split(",") if sep else []:
        name, _, value = part.partition(":")
        if name.strip() not in ("rpm", "tpm") or not value.strip().lstrip("-").isdigit():
            break
        limits[name.strip()] = int(value)
    else:
        if glob and limits:
            return glob, limits
    raise typer.BadParameter(f"{text!r}: expected GLOB=rpm:N,tpm:M (either or both)",
                             param_hint="--model-limit")


def _limits_text(k: dict[str, Any]) -> str:
    per_model = k.get("model_limits") or {}
    return " ".join(f"{g}=" + ",".join(f"{n}:{v}" for n, v in lim.items())
                    for g, lim in per_model.items())


@keys.command("list")
def list_keys(ctx: typer.Context,
              tenant: Annotated[str | None, typer.Option(help="Only this tenant's.")] = None,
              as_json: JsonFlag = False) -> None:
    """Every key (never a secret)."""
    data = _client(ctx).get("/admin/keys", tenant=tenant)
    if as_json:
        _json(data)
        return
    table = Table("key id", "name", "tenant", "models", "rpm", "tpm", "per model", "conc",
                  "priority", "expires", "…")
    for k in data["keys"]:
        expires = "expired" if k["expired"] else (
            time.strftime("%Y-%m-%d %H:%M", time.gmtime(k["expires_at"]))
            if k["expires_at"] else "")
        table.add_row(k["key_id"], k["name"], k["tenant"], ",".join(k["models"]),
                      str(k["rpm"] or ""), str(k["tpm"] or ""), _limits_text(k),
                      str(k["max_concurrent"] or ""),
                      k["priority"], expires, k["hint"])
    out.print(table)


# --no-limit NAME -> the field PATCH sets to null.
_REMOVABLE = {"rpm": "rpm", "tpm": "tpm", "max_concurrent": "max_concurrent",
              "expires": "expires_at", "model_limits": "model_limits"}


@keys.command("update")
def update(
    ctx: typer.Context,
    key_id: str,
    name: Annotated[str | None, typer.Option(help="A new label.")] = None,
    model: Annotated[list[str] | None, typer.Option(
        "--model", help="Alias glob the key may use (repeat): replaces the list.")] = None,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute.")] = None,
    max_concurrent: Annotated[int | None, typer.Option(help="Requests at once.")] = None,
    priority: Annotated[str | None, typer.Option(help="high, normal or low.")] = None,
    expires_in: Annotated[float | None, typer.Option(help="Seconds until it expires.")] = None,
    model_limit: Annotated[list[str] | None, typer.Option(
        "--model-limit", help="GLOB=rpm:N,tpm:M (repeat): replaces the key's per-model "
        "limits.")] = None,
    no_limit: Annotated[list[str] | None, typer.Option(
        "--no-limit", help="Remove one: rpm, tpm, max_concurrent, expires or model_limits "
        "(repeat).")] = None,
    as_json: JsonFlag = False,
) -> None:
    """Change a key: only the options given; its secret stays."""
    given = {"name": name, "models": model, "rpm": rpm, "tpm": tpm,
             "max_concurrent": max_concurrent, "priority": priority}
    body: dict[str, Any] = {k: v for k, v in given.items() if v is not None}
    if model_limit:
        body["model_limits"] = dict(_model_limit(m) for m in model_limit)
    if expires_in is not None:
        body["expires_at"] = time.time() + expires_in
    for item in no_limit or []:
        field = _REMOVABLE.get(item)
        if field is None:
            raise typer.BadParameter(f"{item!r}: one of {', '.join(_REMOVABLE)}",
                                     param_hint="--no-limit")
        if field in body:
            raise typer.BadParameter(f"{item!r} is both set and removed",
                                     param_hint="--no-limit")
        body[field] = None
    if not body:
        raise typer.BadParameter("nothing to change: give at least one option")
    changed = _client(ctx).call("PATCH", f"/admin/keys/{_seg(key_id)}", body)
    if as_json:
        _json(changed)
        return
    out.print(f"updated {key_id}")


@tenants.command("list")
def list_tenants(ctx: typer.Context, as_json: JsonFlag = False) -> None:
    """Every tenant with a key or a limit: its shared limits and number of keys."""
    data = _client(ctx).get("/admin/tenants")
    if as_json:
        _json(data)
        return
    table = Table("tenant", "keys", "shared rpm", "shared tpm")
    for t in data["tenants"]:
        table.add_row(t["tenant"], str(t["keys"]), str(t["rpm"] or ""), str(t["tpm"] or ""))
    out.print(table)


@tenants.command("limits")
def tenant_limits(
    ctx: typer.Context,
    tenant: str,
    rpm: Annotated[int | None, typer.Option(help="Requests per minute, all its keys.")] = None,
    tpm: Annotated[int | None, typer.Option(help="Tokens per minute, all its keys.")] = None,
) -> None:
    """Set the limits a tenant's keys share; both at once (one left out: no limit)."""
    _client(ctx).call("PUT", f"/admin/tenants/{_seg(tenant)}/limits", {"rpm": rpm, "tpm": tpm})
    out.print(f"limits of {tenant}: rpm {rpm or 'none'}, tpm {tpm or 'none'}")


@keys.command("revoke")
def revoke(ctx: typer.Context, key_id: str) -> None:
    """Revoke a key: refused by every router within a second."""
    _client(ctx).delete(f"/admin/keys/{_seg(key_id)}")
    out.print(f"revoked {key_id}")


@keys.command("rotate")
def rotate(ctx: typer.Context, key_id: str, as_json: JsonFlag = False) -> None:
    """A new secret for the key (printed once); the old one is refused."""
    _shown_once(_client(ctx).post(f"/admin/keys/{_seg(key_id)}/rotate"), as_json)


def usage(
    ctx: typer.Context,
    key: Annotated[str | None, typer.Option(help="A key id.")] = None,
    tenant: Annotated[str | None, typer.Option(help="A tenant.")] = None,
    model: Annotated[str | None, typer.Option(help="A model alias.")] = None,
    hours: Annotated[int, typer.Option(
        min=1, max=743, help="The last this many hours (the API keeps at most 31 days of "
        "hourly counters: with the hour now, 743).")] = 24,
    as_json: JsonFlag = False,
) -> None:
    """Requests, tokens, errors and rate-limited requests per key, model and hour."""
    now = time.time()
    data = _client(ctx).get("/admin/usage", key=key, tenant=tenant, model=model,
                            **{"from": int(now - hours * 3600), "to": int(now)})
    if as_json:
        _json(data)
        return
    table = Table("hour (UTC)", "tenant", "key id", "model", "requests", "prompt",
                  "completion", "errors", "429")
    for r in data["rows"]:
        table.add_row(time.strftime("%m-%d %H:00", time.gmtime(r["hour"])), r["tenant"],
                      r["key_id"], r["model"], *(str(r[c]) for c in (
                          "requests", "prompt_tokens", "completion_tokens", "errors",
                          "rate_limited")))
    t = data["total"]
    table.add_row("total", "", "", "", *(str(t[c]) for c in (
        "requests", "prompt_tokens", "completion_tokens", "errors", "rate_limited")))
    out.print(table)
