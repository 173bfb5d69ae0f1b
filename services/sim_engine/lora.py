"""Simulated LoRA adapters, as vLLM serves them with ``--enable-lora`` and
``VLLM_ALLOW_RUNTIME_LORA_UPDATING=True``: ``POST /v1/load_lora_adapter`` and
``/v1/unload_lora_adapter`` with vLLM's bodies and messages, a load delay, and at most
``--max-loras`` adapters at once (one more is refused, so the pool's eviction is tested).
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass, field

from starlette.requests import Request
from starlette.responses import PlainTextResponse, Response

from services.sim_engine.cli import log
from services.sim_engine.protocol import ApiError, error_response, read_json


@dataclass(slots=True)
class LoraState:
    enabled: bool
    max_loras: int
    load_delay: float
    # lora_name -> lora_path, in load order.
    loaded: dict[str, str] = field(default_factory=dict)
    loads: int = 0
    unloads: int = 0
    # ("load" | "unload", name), in order: tests replay it against the LRU policy.
    events: list[tuple[str, str]] = field(default_factory=list)

    def serves(self, name: str) -> bool:
        return name in self.loaded

    def cards(self, base: str, created: int, max_model_len: int) -> list[dict[str, object]]:
        """/v1/models entries of the loaded adapters, shaped as vLLM's."""
        return [{"id": n, "object": "model", "created": created, "owned_by": "vllm",
                 "root": p, "parent": base, "max_model_len": max_model_len}
                for n, p in self.loaded.items()]

    def view(self) -> dict[str, object]:
        return {"loaded": list(self.loaded), "loads": self.loads, "unloads": self.unloads,
                "max_loras": self.max_loras, "events": [list(e) for e in self.events]}


async def _names(request: Request, *fields: str) -> list[str]:
    body = await read_json(request)
    out = []
    for f in fields:
        value = body.get(f)
        if not isinstance(value, str) or not value:
            raise ApiError(400, f"`{f}` must be a non-empty string.")
        out.append(value)
    return out


async def load_adapter(state: LoraState, request: Request) -> Response:
    if not state.enabled:
        return error_response(400, "LoRA is not enabled: start the engine with --enable-lora.")
    try:
        name, path = await _names(request, "lora_name", "lora_path")
    except ApiError as e:
        return error_response(e.status, e.message)
    if name in state.loaded:
        return error_response(400, f"The lora adapter '{name}' has already been loaded.")
    if len(state.loaded) >= state.max_loras:
        return error_response(400, f"No free LoRA slot: {state.max_loras} adapters are loaded "
                                   "(--max-loras); unload one first.")
    # The slot is taken before the delay, so two loads at once cannot both pass the check.
    state.loaded[name] = path
    started = time.monotonic()
    if state.load_delay > 0:
        await asyncio.sleep(state.load_delay)
    state.loads += 1
    state.events.append(("load", name))
    log(f"Loaded new LoRA adapter: name '{name}', path '{path}' "
        f"in {time.monotonic() - started:.2f}s")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' added successfully.")


async def unload_adapter(state: LoraState, request: Request) -> Response:
    if not state.enabled:
        return error_response(400, "LoRA is not enabled: start the engine with --enable-lora.")
    try:
        (name,) = await _names(request, "lora_name")
    except ApiError as e:
        return error_response(e.status, e.message)
    if state.loaded.pop(name, None) is None:
        return error_response(404, f"The lora adapter '{name}' cannot be found.")
    state.unloads += 1
    state.events.append(("unload", name))
    log(f"Removed LoRA adapter: name '{name}'")
    return PlainTextResponse(f"Success: LoRA adapter '{name}' removed successfully.")
