"""API keys: what an operator creates (validated requests) and what routers hold (records).

A key's secret is ``sk-svllm-`` and 43 URL-safe characters from ``secrets`` (256 bits). Only
its SHA-256 is stored. A plain hash is enough, no salt or slow KDF: those defend guessable
secrets (passwords) against a dictionary attack, and a 256-bit random secret has no
dictionary. A fast hash is also what lets every router authenticate a request from a local
dict lookup in about a microsecond.
"""

from __future__ import annotations

import hashlib
import secrets
import time
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import Annotated, Any, Literal

import orjson
from pydantic import BaseModel, ConfigDict, Field

from shared.principal import Principal

SECRET_PREFIX = "sk-svllm-"
# Alias globs: the characters of an alias (shared.models.NAME_PATTERN) plus * ? [ ] !.
_GLOB = r"^[A-Za-z0-9._:/*?\[\]!-]{1,128}$"
_NAME = r"^[A-Za-z0-9._-]{1,64}$"
_TENANT = r"^[A-Za-z0-9._-]{1,64}$"

Priority = Literal["high", "normal", "low"]
Glob = Annotated[str, Field(pattern=_GLOB)]


class ModelLimit(BaseModel):
    """A key's own limits on the models one glob matches (rpm, tpm or both)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000)

    def limits(self) -> dict[str, int]:
        out = {k: v for k, v in (("rpm", self.rpm), ("tpm", self.tpm)) if v is not None}
        if not out:
            raise ValueError("a model limit needs rpm, tpm or both")
        return out


class KeyLimits(BaseModel):
    """The fields an update may change (all optional there)."""

    model_config = ConfigDict(extra="forbid")

    name: str | None = Field(default=None, pattern=_NAME)
    models: list[Glob] | None = Field(default=None, max_length=64)
    rpm: int | None = Field(default=None, ge=1, le=10_000_000)
    tpm: int | None = Field(default=None, ge=1, le=10_000_000_000)
    max_concurrent: int | None = Field(default=None, ge=1, le=1_000_000)
    priority: Priority | None = None
    expires_at: float | None = Field(default=None, gt=0)
    # Alias glob -> limits of the key on each model it matches (each model its own buckets).
    model_limits: dict[Glob, ModelLimit] | None = Field(default=None, max_length=16)

    def model_limits_dict(self) -> dict[str, dict[str, int]]:
        return {g: m.limits() for g, m in (self.model_limits or {}).items()}


class CreateKey(KeyLimits):
    name: str = Field(pattern=_NAME)
    tenant: str = Field(default="default", pattern=_TENANT)
    models: list[Glob] = Field(default_factory=lambda: ["*"], max_length=64)
    priority: Priority = "normal"


class UpdateKey(KeyLimits):
    pass


class TenantLimits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(default=None, ge=1, le=100_000_000)
    tpm: int | None = Field(default=None, ge=1, le=100_000_000_000)


def new_key_id() -> str:
    return "key_" + secrets.token_hex(8)


def new_secret() -> str:
    return SECRET_PREFIX + secrets.token_urlsafe(32)


def hash_secret(secret: bytes) -> str:
    return hashlib.sha256(secret).hexdigest()


@dataclass
class KeyRecord:
    """One key as stored (JSON in its tenant's hash) and as routers hold it."""

    key_id: str
    name: str
    tenant: str
    secret_hash: str
    models: list[str]
    rpm: int | None = None
    tpm: int | None = None
    max_concurrent: int | None = None
    priority: str = "normal"
    expires_at: float | None = None
    created_at: float = 0.0
    updated_at: float = 0.0
    hint: str = ""  # the secret's last four characters, to tell keys apart in lists
    model_limits: dict[str, dict[str, int]] = field(default_factory=dict)
    # Per-router memo of allowed aliases (glob matching once per alias, not per request).
    _allowed: dict[str, bool] = field(default_factory=dict, repr=False, compare=False)
    _principal: Principal | None = field(default=None, repr=False, compare=False)

    def allows(self, alias: str) -> bool:
        ok = self._allowed.get(alias)
        if ok is None:
            ok = any(fnmatchcase(alias, g) for g in self.models)
            if len(self._allowed) < 10_000:
                self._allowed[alias] = ok
        return ok

    def model_limits_of(self, *names: str) -> list[tuple[str, dict[str, int]]]:
        """(glob, limits) of every model limit whose glob matches one of ``names`` (a LoRA
        adapter's and its base model's: each glob once)."""
        return [(g, lim) for g, lim in self.model_limits.items()
                if any(fnmatchcase(n, g) for n in names)]

    def expired(self, now: float | None = None) -> bool:
        return self.expires_at is not None and (now or time.time()) >= self.expires_at

    @property
    def principal(self) -> Principal:
        if self._principal is None:
            self._principal = Principal(self.key_id, self.name, self.tenant, self.priority)
        return self._principal

    def to_json(self) -> str:
        return orjson.dumps({k: v for k, v in self.__dict__.items()
                             if not k.startswith("_")}).decode()

    @classmethod
    def from_json(cls, raw: str) -> KeyRecord:
        data = orjson.loads(raw)
        if not isinstance(data, dict):
            raise ValueError("not an object")
        known = {k: v for k, v in data.items() if k in _FIELDS}
        return cls(**known)

    def view(self) -> dict[str, Any]:
        """What the admin API shows: everything but the hash."""
        out = {k: v for k, v in self.__dict__.items()
               if not k.startswith("_") and k != "secret_hash"}
        out["expired"] = self.expired()
        return out


_FIELDS = frozenset(("key_id", "name", "tenant", "secret_hash", "models", "rpm", "tpm",
                     "max_concurrent", "priority", "expires_at", "created_at", "updated_at",
                     "hint", "model_limits"))
