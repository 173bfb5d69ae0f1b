"""What an operator allows engines to do beyond the safe default, and what vLLM itself knows.

Two checks on top of the allowlist of :mod:`shared.engine_args`, both run by routers when a
model is registered and again by a worker before it launches an engine:

- the **sandbox**: ``--trust-remote-code`` (and weight formats that unpickle) need
  ``ALLOW_TRUST_REMOTE_CODE``; a local ``model_name`` and local file arguments
  (``--chat-template``, ``--download-dir``, ``--lora-modules`` paths, ...) must lie under one of
  ``MODEL_ROOTS``. Each refusal names the setting that would allow it.
- **vLLM's own flags**: workers report the flags of their installed vLLM's argument parser
  (services.worker.engines.vllm_flags); a flag one of them does not know is refused with the
  version, instead of an engine that exits with code 2 at start.
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from shared.engine_args import ArgKind, arg_pairs

if TYPE_CHECKING:  # shared.models imports this module
    from shared.models import ModelSpec

# --load-format values that unpickle weights (torch.load): code from the model repository.
UNPICKLING_FORMATS: frozenset[str] = frozenset({"pt", "npcache"})


class PolicyError(ValueError):
    """A spec the operator's policy (or the installed engine) refuses; the message says why."""


@dataclass(frozen=True)
class Sandbox:
    allow_trust_remote_code: bool = False
    # Absolute, normalised directories; empty: no local path is allowed.
    model_roots: tuple[str, ...] = ()

    @classmethod
    def from_settings(cls, allow_trust_remote_code: bool, model_roots: str) -> Sandbox:
        """From ALLOW_TRUST_REMOTE_CODE and MODEL_ROOTS (comma-separated directories)."""
        roots = [r.strip() for r in model_roots.split(",") if r.strip()]
        bad = [r for r in roots if not r.startswith("/")]
        if bad:
            raise ValueError(f"MODEL_ROOTS entries must be absolute directories: {bad}")
        return cls(allow_trust_remote_code,
                   tuple(posixpath.normpath(r) for r in roots))

    def allows_path(self, path: str) -> bool:
        if not path.startswith("/"):
            return False
        norm = posixpath.normpath(path)
        return any(norm == r or norm.startswith(r.rstrip("/") + "/") for r in self.model_roots)

    def _path_error(self, what: str, path: str) -> PolicyError:
        roots = ", ".join(self.model_roots) or "unset"
        return PolicyError(f"{what} {path!r} is a local path outside MODEL_ROOTS ({roots}): "
                           "give an absolute path under one of them, or add its directory "
                           "to MODEL_ROOTS")

    def _trust_error(self, what: str) -> PolicyError:
        return PolicyError(f"{what} runs code from the model repository: refused unless "
                           "ALLOW_TRUST_REMOTE_CODE=true")


def is_local_path(value: str) -> bool:
    """A filesystem path rather than a hub id ("org/name" or "name")."""
    return value.startswith(("/", ".", "~")) or value.count("/") >= 2


def check_sandbox(engine: str, model_name: str, extra_args: list[str], box: Sandbox) -> None:
    """Raise PolicyError when the spec needs something ``box`` does not allow. ``extra_args``
    are already normalised (shared.engine_args.normalize_extra_args)."""
    # llama.cpp serves a local .gguf file whatever its name looks like.
    if (engine == "llamacpp" or is_local_path(model_name)) and not box.allows_path(model_name):
        raise box._path_error("model_name", model_name)
    for flag, kind, value in arg_pairs(engine, extra_args):
        if flag == "--trust-remote-code" and not box.allow_trust_remote_code:
            raise box._trust_error(flag)
        if flag == "--load-format" and value in UNPICKLING_FORMATS \
                and not box.allow_trust_remote_code:
            raise box._trust_error(f"--load-format {value} (unpickled weights)")
        if value is None:
            continue
        path = value.split("=", 1)[-1] if kind is ArgKind.LORA else value
        if _names_local_file(kind, path) and not box.allows_path(path):
            raise box._path_error(flag, path)


def _names_local_file(kind: ArgKind, value: str) -> bool:
    if kind is ArgKind.LOCAL_PATH:
        return True
    return kind in (ArgKind.PATH, ArgKind.LORA) and is_local_path(value)


@dataclass(frozen=True)
class EngineFlags:
    """What one worker's installed vLLM accepts: its version and its parser's options."""

    worker_id: str
    version: str
    flags: frozenset[str]


def vllm_flags_used(spec: ModelSpec) -> list[str]:
    """The flags of a vLLM spec's argument list that depend on the vLLM version: its extra
    arguments, and sleep mode when the residency policy asks for it."""
    return [*spec.extra_args, *(["--enable-sleep-mode"] if spec.sleep_mode else [])]


def check_known_flags(extra_args: list[str], known: Iterable[EngineFlags]) -> None:
    """Every flag of ``extra_args`` must be known to the vLLM of every worker in ``known``
    (the live workers that reported theirs); the spec may be placed on any of them."""
    flags = [a.split("=", 1)[0] for a in extra_args if a.startswith("-")]
    for info in known:
        for flag in flags:
            if flag not in info.flags:
                raise PolicyError(f"extra argument {flag!r} is not a flag of vLLM "
                                  f"{info.version} (installed on worker {info.worker_id}); "
                                  "it would exit at start")
