"""LoRA adapters on this worker's engines: loaded on demand, least recently used evicted.

The worker owns its engines, so it alone decides what each engine holds. Per engine, loads
and evictions run one at a time (vLLM's slot count is the engine's ``--max-loras``); a request
for an adapter already loaded goes straight through, also while another one loads. An
adapter serving a request is never evicted: a request that needs a slot while every loaded
adapter is busy waits for one to finish, up to the base model's cold-start timeout. What each
engine holds is published (``svllm:{m:<base>}:lora``) so routers prefer replicas that hold it.

Everything here runs on the worker's event loop: the check of the state and the claim of a
slot happen with no ``await`` between them, so no lock is needed.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Awaitable
from dataclasses import dataclass, field

import httpx

from services.worker.engines.base import EngineProcess
from shared.engine_policy import Sandbox, is_local_path
from shared.errors import BadRequest, ModelNotFound, NoCapacity, UpstreamError, clip
from shared.models import AdapterSpec, ModelSpec, lora_capacity
from shared.store import Store

logger = logging.getLogger(__name__)

# The router names the adapter a request is for in this header (its own, never a client's).
ADAPTER_HEADER = "x-svllm-adapter"


@dataclass
class EngineLoras:
    """The adapters one engine process holds, most recently used last."""

    engine: EngineProcess
    capacity: int
    loaded: OrderedDict[str, None] = field(default_factory=OrderedDict)
    inflight: Counter[str] = field(default_factory=Counter)
    changing: bool = False
    changed: asyncio.Event = field(default_factory=asyncio.Event)

    def victim(self) -> str | None:
        """The least recently used adapter serving no request; None when every one is busy."""
        return next((n for n in self.loaded if not self.inflight[n]), None)

    def wake(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()


@dataclass(frozen=True)
class Lease:
    """One request's hold on a loaded adapter: release it once the answer is over."""

    slots: EngineLoras
    name: str

    def release(self) -> None:
        s = self.slots
        s.inflight[self.name] -= 1
        if s.inflight[self.name] <= 0:
            del s.inflight[self.name]
        s.wake()


class LoraManager:
    def __init__(self, store: Store, worker_id: str, client: httpx.AsyncClient,
                 sandbox: Sandbox) -> None:
        self.sandbox = sandbox
        self.store = store
        self.worker_id = worker_id
        self.client = client
        self._engines: dict[str, EngineLoras] = {}

    def holding(self, base: str) -> list[str]:
        slots = self._engines.get(base)
        return list(slots.loaded) if slots else []

    def _slots(self, base: str, spec: ModelSpec, engine: EngineProcess) -> EngineLoras:
        capacity = lora_capacity(spec)
        if capacity is None:
            raise BadRequest(f"model '{base}' was not registered with --enable-lora: it "
                             "cannot serve adapters", param="model")
        slots = self._engines.get(base)
        if slots is None or slots.engine is not engine:
            # A new engine process starts with no adapter loaded.
            slots = self._engines[base] = EngineLoras(engine, capacity)
        return slots

    async def acquire(self, base: str, spec: ModelSpec, engine: EngineProcess, name: str
                      ) -> Lease:
        """A lease on adapter ``name`` loaded in ``engine`` (the base's), loading it first
        (evicting the least recently used idle one when the engine is full)."""
        slots = self._slots(base, spec, engine)
        deadline = time.monotonic() + spec.cold_start_timeout_s
        while True:
            if name in slots.loaded:
                slots.loaded.move_to_end(name)
                slots.inflight[name] += 1
                return Lease(slots, name)
            victim = slots.victim() if len(slots.loaded) >= slots.capacity else None
            if not slots.changing and (victim is not None or len(slots.loaded) < slots.capacity):
                break
            left = deadline - time.monotonic()
            if left <= 0:
                raise NoCapacity(f"adapter '{name}' could not get a LoRA slot on model "
                                 f"'{base}' within {spec.cold_start_timeout_s:g}s (every "
                                 "loaded adapter is busy)", code="lora_slots_busy")
            waiting = slots.changed
            try:
                await asyncio.wait_for(waiting.wait(), left)
            except TimeoutError:
                continue
        slots.changing = True
        if victim is not None:
            del slots.loaded[victim]  # nobody may take it while it is being unloaded
        # The change runs to its end even if this request is cancelled (its client left):
        # the bookkeeping must match what the engine holds.
        await asyncio.shield(asyncio.ensure_future(self._changed(base, slots, name, victim)))
        slots.inflight[name] += 1
        return Lease(slots, name)

    async def _changed(self, base: str, slots: EngineLoras, name: str, victim: str | None
                       ) -> None:
        try:
            await self._change(base, slots, name, victim)
        finally:
            slots.changing = False
            slots.wake()

    async def _change(self, base: str, slots: EngineLoras, name: str, victim: str | None
                      ) -> None:
        adapter = await self.store.get_adapter(name)
        if adapter is None or adapter.base != base:
            raise ModelNotFound(f"adapter '{clip(name)}' of model '{base}' is not registered")
        # Checked again here, as specs are before a launch: MODEL_ROOTS may have changed.
        if is_local_path(adapter.adapter) and not self.sandbox.allows_path(adapter.adapter):
            raise BadRequest(f"adapter '{name}' is a local path outside this worker's "
                             "MODEL_ROOTS", param="model")
        if victim is not None:
            try:
                await self._post(slots.engine, "/v1/unload_lora_adapter",
                                 {"lora_name": victim}, f"unloading adapter '{victim}'")
            except UpstreamError:
                slots.loaded[victim] = None  # still held by the engine, as the oldest
                slots.loaded.move_to_end(victim, last=False)
                raise
            logger.info("evicted LoRA adapter %s from %s (least recently used)", victim, base)
            await self._quietly(self.store.record_adapter_eviction(victim))
        started = time.monotonic()
        await self._load(slots.engine, adapter)
        took = time.monotonic() - started
        slots.loaded[name] = None
        logger.info("loaded LoRA adapter %s on %s in %.2fs", name, base, took)
        await self._quietly(self.store.record_adapter_load(name, took))
        await self._quietly(self.store.set_lora_loaded(base, self.worker_id, list(slots.loaded)))

    async def _load(self, engine: EngineProcess, adapter: AdapterSpec) -> None:
        body = {"lora_name": adapter.alias, "lora_path": adapter.adapter}
        r = await self._send(engine, "/v1/load_lora_adapter", body,
                             f"loading adapter '{adapter.alias}'")
        # Already there (a load whose answer was lost, say to a timeout): as good as loaded.
        if r.status_code >= 400 and "already been loaded" not in r.text:
            raise UpstreamError(f"loading adapter '{adapter.alias}' failed "
                                f"({r.status_code}): {r.text[:300]}")

    async def _post(self, engine: EngineProcess, path: str, body: dict[str, str],
                    what: str) -> None:
        r = await self._send(engine, path, body, what)
        if r.status_code >= 400 and r.status_code != 404:  # 404: already gone
            raise UpstreamError(f"{what} failed ({r.status_code}): {r.text[:300]}")

    async def _send(self, engine: EngineProcess, path: str, body: dict[str, str],
                    what: str) -> httpx.Response:
        try:
            return await engine.post(self.client, path, 300.0, json=dict(body))
        except httpx.HTTPError as e:
            raise UpstreamError(f"{what} failed: {e!r}") from e

    @staticmethod
    async def _quietly(write: Awaitable[None]) -> None:
        """Stats and the published set are hints: a Redis hiccup must not fail a request."""
        try:
            await write
        except Exception as e:  # noqa: BLE001
            logger.warning("could not record a LoRA change in Redis: %s", e)
