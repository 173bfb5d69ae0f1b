"""Which extra engine arguments a model spec may carry, per engine, and their validation.

Extra arguments reach an engine's argument list, so they come from an allowlist: a flag the
list does not name, a flag the pool sets itself (``--port``, ``--host``, ``--model`` ...), or a
value that looks like another flag or a path escape is refused before anything is stored.
"""

from __future__ import annotations

import re
from enum import StrEnum

ENGINES: tuple[str, ...] = ("vllm", "sim", "llamacpp", "sglang")
# Engines that implement vLLM's sleep mode endpoints (/sleep, /wake_up, /is_sleeping).
SLEEP_ENGINES: tuple[str, ...] = ("vllm", "sim")


class ArgKind(StrEnum):
    FLAG = "flag"  # takes no value
    TEXT = "text"  # one token value
    NUMBER = "number"
    PATH = "path"  # a hub id or local path: no '..' segment; local ones under MODEL_ROOTS
    LOCAL_PATH = "local_path"  # a local path: under MODEL_ROOTS
    LORA = "lora"  # name=path (a hub id or local path, as PATH)


# Flags the pool sets itself (or that would hand an engine to someone else: another address,
# a TLS identity, code to import, a file of further arguments): never from a spec.
RESERVED: frozenset[str] = frozenset({
    "--model", "--served-model-name", "--host", "--port", "--uds", "--api-key",
    "--tensor-parallel-size", "-tp", "--gpu-memory-utilization", "--max-model-len",
    "--disable-access-log-for-endpoints", "--ssl-keyfile", "--ssl-certfile", "--ssl-ca-certs",
    "--root-path", "--middleware", "--config", "--allowed-origins", "--log-config-file",
    "--alias", "--model-path", "--tp-size", "--mem-fraction-static", "--context-length",
    "--model_alias", "--n_ctx",
})


_VLLM: dict[str, ArgKind] = {
    "--dtype": ArgKind.TEXT,
    "--quantization": ArgKind.TEXT,
    "--kv-cache-dtype": ArgKind.TEXT,
    "--max-num-seqs": ArgKind.NUMBER,
    "--max-num-batched-tokens": ArgKind.NUMBER,
    "--scheduling-policy": ArgKind.TEXT,
    "--kv-cache-memory-bytes": ArgKind.NUMBER,
    "--seed": ArgKind.NUMBER,
    "--swap-space": ArgKind.NUMBER,
    "--block-size": ArgKind.NUMBER,
    "--pipeline-parallel-size": ArgKind.NUMBER,
    "--enable-prefix-caching": ArgKind.FLAG,
    "--enable-chunked-prefill": ArgKind.FLAG,
    "--enforce-eager": ArgKind.FLAG,
    "--trust-remote-code": ArgKind.FLAG,
    "--enable-sleep-mode": ArgKind.FLAG,
    "--tokenizer": ArgKind.PATH,
    "--revision": ArgKind.TEXT,
    "--tokenizer-mode": ArgKind.TEXT,
    "--generation-config": ArgKind.PATH,
    "--chat-template": ArgKind.PATH,
    "--load-format": ArgKind.TEXT,
    "--download-dir": ArgKind.LOCAL_PATH,
    "--enable-lora": ArgKind.FLAG,
    "--lora-modules": ArgKind.LORA,
    "--max-loras": ArgKind.NUMBER,
    "--max-lora-rank": ArgKind.NUMBER,
    # Logging: harmless. Which of them the installed vLLM knows is checked against its own
    # parser at registration (vLLM 0.32 dropped --disable-log-requests).
    "--disable-log-requests": ArgKind.FLAG,
    "--enable-log-requests": ArgKind.FLAG,
    "--enable-log-outputs": ArgKind.FLAG,
    "--disable-log-stats": ArgKind.FLAG,
    "--disable-uvicorn-access-log": ArgKind.FLAG,
    "--max-log-len": ArgKind.NUMBER,
    "--uvicorn-log-level": ArgKind.TEXT,
}

_SIM: dict[str, ArgKind] = {
    "--startup-delay": ArgKind.NUMBER,
    "--ttft": ArgKind.NUMBER,
    "--itl": ArgKind.NUMBER,
    "--fail-rate": ArgKind.NUMBER,
    "--fail-startup": ArgKind.FLAG,
    "--spawn-child": ArgKind.FLAG,
    "--fail-health-after": ArgKind.NUMBER,
    "--sleep-delay": ArgKind.NUMBER,
    "--wake-delay-l1": ArgKind.NUMBER,
    "--wake-delay-l2": ArgKind.NUMBER,
    "--embedding-dim": ArgKind.NUMBER,
    "--max-tokens-default": ArgKind.NUMBER,
    "--prefix-cache-blocks": ArgKind.NUMBER,
    "--sim-port": ArgKind.NUMBER,
    "--dtype": ArgKind.TEXT,
    "--seed": ArgKind.NUMBER,
    "--max-num-seqs": ArgKind.NUMBER,
    "--enforce-max-num-seqs": ArgKind.FLAG,
    "--scheduling-policy": ArgKind.TEXT,
    "--enable-prefix-caching": ArgKind.FLAG,
    "--enable-sleep-mode": ArgKind.FLAG,
    "--trust-remote-code": ArgKind.FLAG,
    "--enable-lora": ArgKind.FLAG,
    "--max-loras": ArgKind.NUMBER,
    "--max-lora-rank": ArgKind.NUMBER,
    "--lora-load-delay": ArgKind.NUMBER,
}

# llama-server's flags (llama-cpp-python's server spells some differently: see README).
_LLAMACPP: dict[str, ArgKind] = {
    "--threads": ArgKind.NUMBER,
    "--parallel": ArgKind.NUMBER,
    "--batch-size": ArgKind.NUMBER,
    "--n-gpu-layers": ArgKind.NUMBER,
    "--flash-attn": ArgKind.FLAG,
    "--mlock": ArgKind.FLAG,
    "--cont-batching": ArgKind.FLAG,
    "--chat-template": ArgKind.TEXT,
    "--seed": ArgKind.NUMBER,
}

_SGLANG: dict[str, ArgKind] = {
    "--dtype": ArgKind.TEXT,
    "--quantization": ArgKind.TEXT,
    "--kv-cache-dtype": ArgKind.TEXT,
    "--trust-remote-code": ArgKind.FLAG,
    "--chunked-prefill-size": ArgKind.NUMBER,
    "--max-running-requests": ArgKind.NUMBER,
    "--disable-radix-cache": ArgKind.FLAG,
    "--tokenizer-path": ArgKind.PATH,
    "--random-seed": ArgKind.NUMBER,
}

ALLOWED_ARGS: dict[str, dict[str, ArgKind]] = {
    "vllm": _VLLM, "sim": _SIM, "llamacpp": _LLAMACPP, "sglang": _SGLANG,
}

_TEXT_RE = re.compile(r"^[A-Za-z0-9_.:/+=,@-]{1,256}$")
_NUMBER_RE = re.compile(r"^-?[0-9]+(\.[0-9]+)?([eE][-+]?[0-9]+)?$")
_MAX_ARGS = 64


class ExtraArgsError(ValueError):
    """An extra argument the allowlist refuses; the message names it."""


def has_path_escape(value: str) -> bool:
    """True when any '/'-separated segment is '..'."""
    return any(part == ".." for part in value.replace("\\", "/").split("/"))


def _check_value(flag: str, kind: ArgKind, value: str) -> None:
    if value.startswith("-") and kind is not ArgKind.NUMBER:
        raise ExtraArgsError(f"value for {flag} must not start with '-': {value!r}")
    if kind is ArgKind.NUMBER and not _NUMBER_RE.fullmatch(value):
        raise ExtraArgsError(f"value for {flag} must be a number: {value!r}")
    if kind is not ArgKind.NUMBER and not _TEXT_RE.fullmatch(value):
        raise ExtraArgsError(f"value for {flag} has characters that are not allowed: {value!r}")
    if kind in (ArgKind.PATH, ArgKind.LOCAL_PATH, ArgKind.LORA) and has_path_escape(value):
        raise ExtraArgsError(f"value for {flag} must not contain a '..' segment: {value!r}")


def normalize_extra_args(engine: str, args: list[str]) -> list[str]:
    """Validate ``args`` for ``engine`` and return them as ``[flag, value?, ...]``.

    ``--flag=value`` is split into two items so equal specs compare equal.
    Raises :class:`ExtraArgsError` naming the first offending item.
    """
    allowed = ALLOWED_ARGS.get(engine)
    if allowed is None:
        raise ExtraArgsError(f"unknown engine {engine!r}")
    if len(args) > _MAX_ARGS:
        raise ExtraArgsError(f"at most {_MAX_ARGS} extra arguments are allowed")
    out: list[str] = []
    i = 0
    while i < len(args):
        item = args[i]
        flag, eq, inline = item.partition("=")
        kind = allowed.get(flag)
        if kind is None and flag in RESERVED:
            raise ExtraArgsError(f"extra argument {flag!r} is set by the pool itself")
        if kind is None:
            raise ExtraArgsError(f"extra argument {flag!r} is not allowed for engine {engine!r}")
        if kind is ArgKind.FLAG:
            if eq:
                raise ExtraArgsError(f"{flag} takes no value")
            out.append(flag)
            i += 1
            continue
        if eq:
            value, i = inline, i + 1
        elif i + 1 < len(args):
            value, i = args[i + 1], i + 2
        else:
            raise ExtraArgsError(f"{flag} needs a value")
        _check_value(flag, kind, value)
        out += [flag, value]
    return out


def arg_pairs(engine: str, normalized: list[str]) -> list[tuple[str, ArgKind, str | None]]:
    """(flag, kind, value or None) of arguments already passed through
    :func:`normalize_extra_args`."""
    allowed = ALLOWED_ARGS[engine]
    out: list[tuple[str, ArgKind, str | None]] = []
    i = 0
    while i < len(normalized):
        kind = allowed[normalized[i]]
        if kind is ArgKind.FLAG:
            out.append((normalized[i], kind, None))
            i += 1
        else:
            out.append((normalized[i], kind, normalized[i + 1]))
            i += 2
    return out
