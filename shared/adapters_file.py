"""LoRA adapters in the models file (its ``adapters:`` list): entries validated as ``POST
/admin/adapters`` validates a body, against the models the pool will have once the file is
applied, and written back by ``svllm export``.

An entry is ``{alias, base, adapter}``. Refused, naming the entry: a field that is not one of
those or not a valid name (the register API's own :class:`AdapterSpec`), an alias that
appears twice or is also a model's, a base that is neither in the file nor in the pool (or
that ``prune`` would delete), a base not started with ``--enable-lora``, and a local adapter
path outside MODEL_ROOTS.
"""

from __future__ import annotations

from typing import Any

from pydantic import ValidationError

from shared.engine_policy import Sandbox, is_local_path
from shared.models import AdapterSpec, ModelSpec, lora_capacity


class AdapterFileError(ValueError):
    """One bad entry; :mod:`shared.models_file` turns it into its SpecError."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


def desired_adapters(entries: Any, models: dict[str, ModelSpec], sandbox: Sandbox | None
                     ) -> dict[str, AdapterSpec]:
    """The file's adapter entries by alias. ``models``: every model the pool will have once
    the file is applied (the file's, and the pool's that stay)."""
    if not isinstance(entries, list):
        raise AdapterFileError("adapters must be a list of entries (one per alias)",
                               param="adapters")
    sandbox = sandbox or Sandbox()
    out: dict[str, AdapterSpec] = {}
    for i, entry in enumerate(entries):
        name = entry.get("alias") if isinstance(entry, dict) else None
        where = f"adapters[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        try:
            spec = AdapterSpec.model_validate(entry)
        except ValidationError as e:
            first = e.errors()[0]
            loc = ".".join(str(p) for p in first["loc"])
            msg = first["msg"].removeprefix("Value error, ")
            raise AdapterFileError(f"{where}: {loc}: {msg}" if loc else f"{where}: {msg}",
                                   param=loc or None) from None
        _check(spec, where, out, models, sandbox)
        out[spec.alias] = spec
    return out


def _check(spec: AdapterSpec, where: str, seen: dict[str, AdapterSpec],
           models: dict[str, ModelSpec], sandbox: Sandbox) -> None:
    if spec.alias in seen:
        raise AdapterFileError(f"{where}: alias '{spec.alias}' appears twice", param="alias")
    if spec.alias in models:
        raise AdapterFileError(f"{where}: alias '{spec.alias}' is a model's", param="alias")
    base = models.get(spec.base)
    if base is None:
        raise AdapterFileError(f"{where}: base model '{spec.base}' is neither in the file nor "
                               "registered (or the file prunes it)", param="base")
    if lora_capacity(base) is None:
        raise AdapterFileError(f"{where}: base model '{spec.base}' does not have "
                               "--enable-lora in its extra_args", param="base")
    if is_local_path(spec.adapter) and not sandbox.allows_path(spec.adapter):
        roots = ", ".join(sandbox.model_roots) or "unset"
        raise AdapterFileError(f"{where}: adapter {spec.adapter!r} is a local path outside "
                               f"MODEL_ROOTS ({roots})", param="adapter")


def export_entries(adapters: list[AdapterSpec]) -> list[dict[str, Any]]:
    return [a.model_dump() for a in sorted(adapters, key=lambda a: a.alias)]
