"""The declarative models file: which models the pool should serve, and how to get there.

One module for the three users of the format: the router's ``POST /admin/models/apply`` (what
``svllm apply`` calls), ``svllm export``, and a manager's ``MODELS_FILE``. Entries carry the
register API's fields and are validated by the register API's own models
(:class:`RegisterModelRequest` then :class:`ModelSpec`), so a file entry and a registration
fail with the same message.

A changed spec is applied as delete + register (the store refuses to overwrite a spec: a
running engine would no longer match its record), so the model's instances restart.

LoRA adapters are the file's optional ``adapters:`` list (:mod:`shared.adapters_file`). A file
without that key leaves the pool's adapters alone; with it (even empty), they are diffed and
applied like models: changed ones (and, with prune, those not in the file) are deleted before
the models change, added and changed ones registered after, so their bases exist by then.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, cast

import yaml
from pydantic import BaseModel, ValidationError

from shared.adapters_file import AdapterFileError, desired_adapters, export_entries
from shared.engine_policy import (
    EngineFlags,
    PolicyError,
    Sandbox,
    check_known_flags,
    vllm_flags_used,
)
from shared.models import AdapterSpec, ModelSpec, RegisterModelRequest

if TYPE_CHECKING:
    from shared.store.base import StoredModel

class SpecError(ValueError):
    """A bad file or entry; the HTTP edge answers 400 with this message. (Not an ApiError:
    the CLI imports this module and should not pay for the web framework's import.)"""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param


_REQUEST_DEFAULTS = RegisterModelRequest(alias="x", model_name="x").model_dump()


class ModelsStoreLike(Protocol):
    """What applying needs from :class:`shared.store.Store`."""

    async def list_models(self) -> list[StoredModel]: ...
    async def register_model(self, spec: ModelSpec) -> bool: ...
    async def delete_model(self, alias: str) -> bool: ...
    async def live_vllm_flags(self) -> list[EngineFlags]: ...


class AdaptersStoreLike(ModelsStoreLike, Protocol):
    """What applying a file with ``adapters:`` needs besides."""

    async def list_adapters(self) -> dict[str, AdapterSpec]: ...
    async def register_adapter(self, spec: AdapterSpec) -> str: ...
    async def delete_adapter(self, alias: str) -> bool: ...


@dataclass
class Diff:
    """What applying a file changes: per alias, added, changed (field -> [old, new]), removed
    (present in the pool, absent from the file; only acted on with prune)."""

    added: list[str] = field(default_factory=list)
    changed: dict[str, dict[str, list[Any]]] = field(default_factory=dict)
    removed: list[str] = field(default_factory=list)
    unchanged: list[str] = field(default_factory=list)
    # The same for LoRA adapters; None when the file has no ``adapters:`` (left alone).
    adapters: Diff | None = None

    def empty(self, prune: bool) -> bool:
        return not (self.added or self.changed or (prune and self.removed)) and (
            self.adapters is None or self.adapters.empty(prune))

    def as_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = {"added": self.added, "changed": self.changed,
                               "removed": self.removed, "unchanged": self.unchanged}
        if self.adapters is not None:
            out["adapters"] = self.adapters.as_dict()
        return out


def to_spec(entry: Any, default_engine: str, sandbox: Sandbox | None = None) -> ModelSpec:
    """One entry validated as ``POST /admin/models/register`` validates a body (it calls
    this), the operator's ``sandbox`` included (the strict default when None)."""
    try:
        return RegisterModelRequest.model_validate(entry).to_spec(default_engine, sandbox)
    except ValidationError as e:
        raise _first_error(e) from None
    except PolicyError as e:
        param = "model_name" if str(e).startswith("model_name") else "extra_args"
        raise SpecError(str(e), param=param) from None
    except ValueError as e:
        raise SpecError(str(e) or "invalid model spec", param="engine") from None


async def check_flags(specs: list[ModelSpec], store: ModelsStoreLike, *,
                      name_alias: bool = True) -> None:
    """vLLM specs' extra flags against the flags the live workers' vLLM knows (a flag it
    does not know would make the engine exit at start): SpecError naming flag and version
    (and the alias, for a file's entries)."""
    wanted = [s for s in specs if s.engine == "vllm"]
    if not wanted:
        return
    known = await store.live_vllm_flags()
    for spec in wanted:
        try:
            check_known_flags(vllm_flags_used(spec), known)
        except PolicyError as e:
            message = f"{spec.alias}: {e}" if name_alias else str(e)
            raise SpecError(message, param="extra_args") from None


def _first_error(e: ValidationError) -> SpecError:
    """The first error's own message, as shared.http.parse_as words it (pydantic's str()
    spans lines and ends with a help URL)."""
    first = e.errors()[0]
    loc = ".".join(str(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    return SpecError(f"{loc}: {msg}" if loc else msg, param=loc or None)


def desired_specs(entries: Any, default_engine: str, sandbox: Sandbox | None = None
                  ) -> dict[str, ModelSpec]:
    """The file's entries as specs by alias; a bad entry fails the whole file, naming it."""
    if not isinstance(entries, list):
        raise SpecError("models must be a list of entries (one per alias)", param="models")
    specs: dict[str, ModelSpec] = {}
    for i, entry in enumerate(entries):
        name = entry.get("alias") if isinstance(entry, dict) else None
        where = f"models[{i}]" + (f" ({name})" if isinstance(name, str) else "")
        try:
            spec = to_spec(entry, default_engine, sandbox)
        except SpecError as e:
            raise SpecError(f"{where}: {e.message}", param=e.param) from None
        if spec.alias in specs:
            raise SpecError(f"{where}: alias '{spec.alias}' appears twice", param="alias")
        specs[spec.alias] = spec
    return specs


def _yaml_problem(e: yaml.YAMLError) -> str:
    """One line: what is wrong and where (PyYAML's own text spans several lines)."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"{e.problem} (line {mark.line + 1}, column {mark.column + 1})"
    return " ".join(str(e).split())


@dataclass(frozen=True)
class Document:
    """A models file: its ``models:`` entries, and its ``adapters:`` entries (None: no such
    key, the pool's adapters are left alone)."""

    models: list[Any]
    adapters: list[Any] | None = None


def parse_document(text: str, source: str = "models file") -> Document:
    """A YAML models file (``{models: [...], adapters: [...]}``; an empty file is none)."""
    try:
        doc = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise SpecError(f"{source} is not valid YAML: {_yaml_problem(e)}") from None
    if doc is None:
        return Document([])
    if not isinstance(doc, dict) or set(doc) - {"models", "adapters"}:
        raise SpecError(f"{source} must be a mapping with one key, 'models' (a list), and "
                        "optionally 'adapters' (a list)")
    models = doc.get("models") or []
    if not isinstance(models, list):
        raise SpecError(f"{source}: 'models' must be a list of entries")
    adapters: list[Any] | None = None
    if "adapters" in doc:
        adapters = doc["adapters"] or []
        if not isinstance(adapters, list):
            raise SpecError(f"{source}: 'adapters' must be a list of entries")
    return Document(models, adapters)


def parse_yaml(text: str, source: str = "models file") -> list[Any]:
    """The ``models:`` list of a YAML document."""
    return parse_document(text, source).models


def read_document(path: Path) -> Document:
    try:
        text = path.read_text()
    except OSError as e:
        raise SpecError(f"cannot read {path}: {e.strerror}") from None
    return parse_document(text, str(path))


def read_file(path: Path) -> list[Any]:
    return read_document(path).models


async def plan(store: ModelsStoreLike, doc: Document, default_engine: str,
               sandbox: Sandbox | None, prune: bool,
               ) -> tuple[dict[str, ModelSpec], dict[str, AdapterSpec] | None]:
    """A document's models and adapters validated, the adapters against the models the pool
    will have once it is applied (SpecError naming the entry at fault)."""
    desired = desired_specs(doc.models, default_engine, sandbox)
    await check_flags(list(desired.values()), store)
    if doc.adapters is None:
        return desired, None
    kept = {} if prune else {m.spec.alias: m.spec for m in await store.list_models()}
    try:
        return desired, desired_adapters(doc.adapters, kept | desired, sandbox)
    except AdapterFileError as e:
        raise SpecError(e.message, param=e.param) from None


def diff(desired: Mapping[str, BaseModel], current: Mapping[str, BaseModel]) -> Diff:
    d = Diff()
    for alias, spec in desired.items():
        old = current.get(alias)
        if old is None:
            d.added.append(alias)
            continue
        new_fields, old_fields = spec.model_dump(), old.model_dump()
        changes = {k: [old_fields.get(k), v] for k, v in new_fields.items()
                   if old_fields.get(k) != v}
        if changes:
            d.changed[alias] = changes
        else:
            d.unchanged.append(alias)
    d.removed = sorted(set(current) - set(desired))
    return d


async def apply(store: ModelsStoreLike, desired: dict[str, ModelSpec], *, prune: bool,
                dry_run: bool, adapters: dict[str, AdapterSpec] | None = None) -> Diff:
    """Make the pool's specs match ``desired`` (and its adapters ``adapters``, unless None);
    returns the diff (applied unless dry_run)."""
    current = {m.spec.alias: m.spec for m in await store.list_models()}
    d = diff(desired, current)
    lora: AdaptersStoreLike | None = None
    if adapters is not None:
        lora = cast("AdaptersStoreLike", store)
        d.adapters = diff(adapters, await lora.list_adapters())
    if dry_run:
        return d
    if lora is not None and d.adapters is not None:
        gone = [*d.adapters.changed, *(d.adapters.removed if prune else [])]
        for alias in gone:
            await lora.delete_adapter(alias)
    for alias in d.changed:
        await store.delete_model(alias)
        await store.register_model(desired[alias])
    for alias in d.added:
        await store.register_model(desired[alias])
    if prune:
        for alias in d.removed:
            await store.delete_model(alias)
    if lora is not None and adapters is not None and d.adapters is not None:
        for alias in [*d.adapters.changed, *d.adapters.added]:
            await lora.register_adapter(adapters[alias])
    return d


def export_entry(spec: ModelSpec) -> dict[str, Any]:
    """A spec as a file entry: alias, model_name, engine, and the fields that differ from the
    register API's defaults (applying it gives the same spec back)."""
    data = spec.model_dump()
    out: dict[str, Any] = {k: data[k] for k in ("alias", "model_name", "engine")}
    for k, v in data.items():
        if k not in out and _REQUEST_DEFAULTS.get(k) != v:
            out[k] = v
    return out


def export_yaml(specs: list[ModelSpec], adapters: list[AdapterSpec] | None = None) -> str:
    """The file ``svllm export`` writes; ``adapters:`` only when there are any."""
    doc: dict[str, Any] = {"models": [export_entry(s)
                                      for s in sorted(specs, key=lambda s: s.alias)]}
    if adapters:
        doc["adapters"] = export_entries(adapters)
    return str(yaml.safe_dump(doc, sort_keys=False, default_flow_style=False))
