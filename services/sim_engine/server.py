"""HTTP surface of the simulated engine: vLLM's OpenAI-compatible API, sleep mode and metrics.

Answers come from textgen's deterministic output, paced by the configured latencies. With zero
latency a request neither sleeps nor starts a task, so a benchmark measures the pool around the
engine rather than the simulator.
"""

from __future__ import annotations

import asyncio
import gc
import hmac
import os
import random
import time
from collections import deque
from collections.abc import AsyncGenerator, AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass
from functools import partial

from starlette.applications import Starlette
from starlette.exceptions import HTTPException
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route
from starlette.types import Receive, Scope, Send

from services.sim_engine import textgen
from services.sim_engine.cli import EngineConfig, log
from services.sim_engine.extra_api import ExtraApi
from services.sim_engine.lora import LoraState, load_adapter, unload_adapter
from services.sim_engine.metrics import PROMETHEUS, Gauges, render
from services.sim_engine.prefix_cache import PrefixCache
from services.sim_engine.protocol import (
    DONE_EVENT,
    ApiError,
    Body,
    GenSpec,
    JSONResponse,
    encode_embedding,
    error_response,
    final_choice,
    gen_spec,
    read_json,
    sse,
    stream_choice,
)
from services.sim_engine.seats import Seats

Handler = Callable[[Request, Body], Awaitable[Response]]


async def _wait_disconnect(receive: Receive) -> None:
    while (await receive())["type"] != "http.disconnect":
        pass


async def finish_or_disconnect(work: Awaitable[None], receive: Receive) -> bool:
    """Run ``work`` to the end (True) unless the client goes first (False; work is cancelled).

    Only called once the request body has been read, so ``receive`` can only report the
    disconnect.
    """
    task = asyncio.ensure_future(work)
    watch = asyncio.ensure_future(_wait_disconnect(receive))
    try:
        await asyncio.wait((task, watch), return_when=asyncio.FIRST_COMPLETED)
    finally:
        task.cancel()
        watch.cancel()
        # Let both unwind (the generator's accounting runs in its finally) before going on.
        await asyncio.wait((task, watch))
    if task.cancelled():
        return False
    task.result()
    return True


class EventStream(Response):
    """A ``text/event-stream`` answer: each event is its own body chunk, never batched.

    Generation stops when the client disconnects: with ``watch`` the stream races a
    disconnect listener. Zero-latency streams skip the listener (nothing to interrupt).
    """

    media_type = "text/event-stream"

    def __init__(self, events: AsyncGenerator[bytes, None], watch: bool) -> None:
        self.events = events
        self.watch = watch
        self.status_code = 200
        self.background = None
        self.init_headers({"cache-control": "no-cache"})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        start = {"type": "http.response.start", "status": 200, "headers": self.raw_headers}
        await send(start)
        if self.watch:
            await finish_or_disconnect(self._pump(send), receive)
        else:
            await self._pump(send)

    async def _pump(self, send: Send) -> None:
        try:
            async for event in self.events:
                await send({"type": "http.response.body", "body": event, "more_body": True})
            await send({"type": "http.response.body", "body": b"", "more_body": False})
        finally:
            # A server whose send raises on disconnect leaves the generator suspended.
            await self.events.aclose()


async def _pause(seconds: float) -> None:
    if seconds > 0:
        await asyncio.sleep(seconds)


@dataclass(slots=True)
class Stats:
    requests: int = 0
    completed: int = 0
    aborted: int = 0
    running: int = 0
    sleeps: int = 0
    wakes: int = 0
    prompt_tokens: int = 0
    generation_tokens: int = 0
    # Bytes of audio uploads received so far, counted as each piece arrives (a test reads it
    # mid-upload to see the body is relayed, not buffered, on the way here).
    upload_bytes: int = 0
    uploads: int = 0  # audio uploads received whole


_SEEN_MAX = 256
_NO_SLEEP_MODE = "Sleep mode is not enabled: start the engine with --enable-sleep-mode."
_ENGINE_DEAD = "EngineCore encountered an issue. See stack trace (above) for the root cause."
class SimEngine:
    """The engine's state and its request handlers."""

    def __init__(self, config: EngineConfig) -> None:
        self.config = config
        self.stats = Stats()
        self.sleep_level: int | None = None
        self.health_failing = False
        self._sleep_lock = asyncio.Lock()
        self._rng = random.Random(config.seed)
        # Starts at --fail-rate; tests change it on one replica with POST /sim/faults.
        self.fail_rate = config.fail_rate
        # The x-request-id of the latest API request, in /sim/stats: tests check that the id
        # an answer carries is the one that reached the engine.
        self.last_request_id: str | None = None
        # The ids (and W3C traceparents) of the latest API requests, oldest first, in
        # /sim/stats: tests check that a request's id and trace reach the engine.
        self.request_ids: deque[str | None] = deque(maxlen=_SEEN_MAX)
        self.traceparents: deque[str | None] = deque(maxlen=_SEEN_MAX)
        self._auth = f"Bearer {config.api_key}".encode() if config.api_key else None
        self._paced = config.ttft > 0 or config.itl > 0
        label = config.served_model_name.replace("\\", "\\\\").replace('"', '\\"')
        self._label_inner = f'model_name="{label}"'
        # The simulated engine core dies at this monotonic time (None: never).
        self._dies_at = (time.monotonic() + config.fail_health_after
                         if config.fail_health_after is not None else None)
        self._dead = False
        self.prefix_cache = PrefixCache(config.prefix_cache_blocks)
        self.lora = LoraState(config.enable_lora, config.max_loras, config.lora_load_delay)
        self.seats = Seats(config.max_num_seqs, config.scheduling_policy == "priority") \
            if config.enforce_max_num_seqs else None
        self.last_priority: int | None = None

    # --- request plumbing -------------------------------------------------------------------

    def _authorized(self, request: Request) -> bool:
        if self._auth is None:
            return True
        given = request.headers.get("authorization", "").encode()
        return hmac.compare_digest(given, self._auth)

    def api(self, handler: Handler) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a generation endpoint: auth, JSON body, model check, sleep check, errors."""

        async def endpoint(request: Request) -> Response:
            if not self._authorized(request):
                return error_response(401, "Unauthorized")
            self.stats.requests += 1
            self.last_request_id = request.headers.get("x-request-id")
            self.request_ids.append(self.last_request_id)
            self.traceparents.append(request.headers.get("traceparent"))
            try:
                body = await read_json(request)
                model = body.get("model")
                self._check(model)
                # Which model answers (the base, or a loaded LoRA adapter), as vLLM says.
                request.state.model = model if isinstance(model, str) else \
                    self.config.served_model_name
                return await handler(request, body)
            except ApiError as exc:
                return error_response(exc.status, exc.message)

        return endpoint

    def form_api(self, handler: Callable[[Request], Awaitable[Response]],
                 ) -> Callable[[Request], Awaitable[Response]]:
        """Wrap a multipart endpoint (audio): auth, sleep check, errors; it checks the model."""

        async def endpoint(request: Request) -> Response:
            if not self._authorized(request):
                return error_response(401, "Unauthorized")
            self.stats.requests += 1
            self.last_request_id = request.headers.get("x-request-id")
            try:
                self._check(None)
                if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
                    # Before the upload is read, as an engine that fails at once would.
                    raise ApiError(500, "simulated engine failure")
                return await handler(request)
            except ApiError as exc:
                return error_response(exc.status, exc.message)

        return endpoint

    def _check(self, model: object) -> None:
        """404 for another model, 500 once the core died, 503 while asleep."""
        if model is not None and model != self.config.served_model_name \
                and not (isinstance(model, str) and self.lora.serves(model)):
            raise ApiError(404, f"The model `{model}` does not exist.")
        if self.engine_dead():
            raise ApiError(500, _ENGINE_DEAD)
        if self.sleep_level is not None:
            raise ApiError(503, "engine is sleeping")

    def _head(self, spec: GenSpec, model: str) -> Body:
        prefix, kind = ("chatcmpl", "chat.completion") if spec.chat else ("cmpl", "text_completion")
        return {"id": f"{prefix}-{os.urandom(16).hex()}", "object": kind,
                "created": int(time.time()), "model": model}

    def _begin(self, spec: GenSpec) -> None:
        self.stats.running += 1
        self.stats.prompt_tokens += sum(tokens for _, tokens in spec.prompts)

    def _end(self, ok: bool) -> None:
        self.stats.running -= 1
        if ok:
            self.stats.completed += 1
        else:
            self.stats.aborted += 1

    # --- generation -------------------------------------------------------------------------

    async def chat(self, request: Request, body: Body) -> Response:
        messages = body.get("messages")
        if not isinstance(messages, list) or not messages:
            raise ApiError(400, "`messages` must be a non-empty list of messages.")
        prompt = textgen.chat_prompt(messages)
        if prompt is None:
            raise ApiError(400, "Each message needs a string `role` and text `content`.")
        return await self._generate(request, gen_spec(body, True, [prompt], self.config))

    async def completions(self, request: Request, body: Body) -> Response:
        prompts = textgen.completion_prompts(body.get("prompt"))
        if prompts is None:
            raise ApiError(400, "`prompt` must be a string, a list of strings or of token ids.")
        return await self._generate(request, gen_spec(body, False, prompts, self.config))

    async def _generate(self, request: Request, spec: GenSpec) -> Response:
        if self.fail_rate > 0 and self._rng.random() < self.fail_rate:
            raise ApiError(500, "simulated engine failure")
        ttft = self._ttft(spec)
        self.last_priority = spec.priority
        if spec.stream:
            return EventStream(self._events(spec, ttft, request.state.model),
                               watch=self._paced)
        self._begin(spec)
        ok = False
        try:
            delay = ttft + (spec.max_tokens - 1) * self.config.itl
            # The client may leave while the "GPU" works: race the wait against the disconnect.
            if delay > 0 and not await finish_or_disconnect(self._run(spec, delay),
                                                            request.receive):
                return Response(status_code=499)  # nobody is left to read it
            ok = True
        finally:
            self._end(ok)
        self.stats.generation_tokens += spec.max_tokens * len(spec.prompts)
        head = self._head(spec, request.state.model)
        choices = [final_choice(spec, i, p) for i, (p, _) in enumerate(spec.prompts)]
        body = {**head, "choices": choices, "usage": spec.usage()}
        if spec.chat:
            body["prompt_logprobs"] = None
        return JSONResponse(body)

    def _ttft(self, spec: GenSpec) -> float:
        """The time to first token: prefill is most of it, and the prompt's cached share
        (the prefix cache) skips that much of it."""
        cached = [self.prefix_cache.lookup(p) for p, _ in spec.prompts]
        return self.config.ttft * (1.0 - 0.8 * min(cached))

    async def _run(self, spec: GenSpec, delay: float) -> None:
        """Generate for ``delay`` seconds, once a seat in the batch is free."""
        if self.seats is None:
            await asyncio.sleep(delay)
            return
        await self.seats.take(spec.priority)
        try:
            await asyncio.sleep(delay)
        finally:
            self.seats.give_back()

    async def _events(self, spec: GenSpec, ttft: float, model: str,
                      ) -> AsyncGenerator[bytes, None]:
        head = self._head(spec, model)
        head["object"] += ".chunk" if spec.chat else ""
        all_tokens = [textgen.generate_tokens(p, spec.max_tokens) for p, _ in spec.prompts]
        self._begin(spec)
        ok = False
        seated = False
        try:
            if self.seats is not None:
                await self.seats.take(spec.priority)
                seated = True
            if spec.chat:
                first = {"index": 0, "delta": {"role": "assistant", "content": ""},
                         "logprobs": None, "finish_reason": None}
                yield sse({**head, "choices": [first]})
            for step in range(spec.max_tokens):
                await _pause(ttft if step == 0 else self.config.itl)
                for index, tokens in enumerate(all_tokens):
                    self.stats.generation_tokens += 1
                    yield sse({**head, "choices": [stream_choice(spec, index, tokens[step], None)]})
            for index in range(len(all_tokens)):
                yield sse({**head, "choices": [stream_choice(spec, index, None, "length")]})
            if spec.include_usage:
                yield sse({**head, "choices": [], "usage": spec.usage()})
            yield DONE_EVENT
            ok = True
        finally:
            if seated and self.seats is not None:
                self.seats.give_back()
            self._end(ok)

    async def embeddings(self, request: Request, body: Body) -> Response:
        inputs = textgen.completion_prompts(body.get("input"))
        if inputs is None:
            raise ApiError(400, "`input` must be a string or a list of strings.")
        fmt = body.get("encoding_format") or "float"
        if fmt not in ("float", "base64"):
            raise ApiError(400, "`encoding_format` must be 'float' or 'base64'.")
        dim = self.config.embedding_dim
        if body.get("dimensions") not in (None, dim):
            raise ApiError(400, f"This model only produces {dim}-dimensional embeddings.")
        vectors = [encode_embedding(textgen.embed(text, dim), fmt) for text, _ in inputs]
        data = [{"object": "embedding", "index": i, "embedding": vector}
                for i, vector in enumerate(vectors)]
        tokens = sum(n for _, n in inputs)
        self.stats.prompt_tokens += tokens
        self.stats.completed += 1
        usage = {"prompt_tokens": tokens, "total_tokens": tokens}
        return JSONResponse({"id": f"embd-{os.urandom(16).hex()}", "object": "list",
                             "created": int(time.time()), "model": request.state.model,
                             "data": data, "usage": usage})

    # --- other endpoints --------------------------------------------------------------------

    async def models(self, request: Request) -> Response:
        if not self._authorized(request):
            return error_response(401, "Unauthorized")
        created = int(time.time())
        card = {"id": self.config.served_model_name, "object": "model",
                "created": created, "owned_by": "vllm", "root": self.config.model,
                "parent": None, "max_model_len": self.config.max_model_len}
        adapters = self.lora.cards(self.config.served_model_name, created,
                                   self.config.max_model_len)
        return JSONResponse({"object": "list", "data": [card, *adapters]})

    async def sleep(self, request: Request) -> Response:
        if not self.config.enable_sleep_mode:
            return error_response(400, _NO_SLEEP_MODE)
        level = request.query_params.get("level", "1")
        if level not in ("1", "2"):
            return error_response(400, f"Invalid sleep level {level!r}: expected 1 or 2.")
        async with self._sleep_lock:
            if self.sleep_level is None:
                await _pause(self.config.sleep_delay)
                self.sleep_level = int(level)
                self.stats.sleeps += 1
                log(f"engine asleep (level {level})")
        return Response(status_code=200)

    async def wake_up(self, request: Request) -> Response:
        if not self.config.enable_sleep_mode:
            return error_response(400, _NO_SLEEP_MODE)
        async with self._sleep_lock:
            if self.sleep_level is not None:
                level_one = self.sleep_level == 1
                await _pause(self.config.wake_delay_l1 if level_one else self.config.wake_delay_l2)
                self.sleep_level = None
                self.stats.wakes += 1
                log("engine awake")
        return Response(status_code=200)

    async def is_sleeping(self, request: Request) -> Response:
        return JSONResponse({"is_sleeping": self.sleep_level is not None})

    def engine_dead(self) -> bool:
        """The simulated engine core is gone (API server still up), as after vLLM's
        EngineDeadError: /health 503, generation 500."""
        if self._dies_at is not None and time.monotonic() >= self._dies_at:
            self._dead, self._dies_at = True, None
            log("EngineCore died (--fail-health-after)", "ERROR")
        return self._dead

    async def health(self, request: Request) -> Response:
        return Response(status_code=503 if self.health_failing or self.engine_dead() else 200)

    async def fail_health(self, request: Request) -> Response:
        """Test knob: /health answers 503 from now on while requests are still served (an
        engine core dead behind a live API server, as seen with vLLM)."""
        self.health_failing = True
        log("health check set to fail")
        return Response(status_code=200)

    async def sim_fault(self, request: Request) -> Response:
        """POST /sim/fault {"dead": true|false}: kill or revive the simulated engine core."""
        try:
            body = await read_json(request)
        except ApiError as exc:
            return error_response(exc.status, exc.message)
        dead = body.get("dead")
        if not isinstance(dead, bool):
            return error_response(400, "`dead` must be a boolean.")
        self._dead, self._dies_at = dead, None
        log(f"EngineCore {'died' if dead else 'revived'} (POST /sim/fault)",
            "ERROR" if dead else "INFO")
        return JSONResponse({"dead": dead})

    async def version(self, request: Request) -> Response:
        return JSONResponse({"version": "0.0.0+sim"})

    async def sim_stats(self, request: Request) -> Response:
        s = self.stats
        return JSONResponse({"requests": s.requests, "completed": s.completed,
                             "aborted": s.aborted, "running": s.running,
                             "sleeping": self.sleep_level is not None,
                             "sleep_level": self.sleep_level, "sleeps": s.sleeps,
                             "wakes": s.wakes, "last_request_id": self.last_request_id,
                             "upload_bytes": s.upload_bytes, "uploads": s.uploads,
                             "lora": self.lora.view(), "last_priority": self.last_priority,
                             "request_ids": list(self.request_ids),
                             "traceparents": list(self.traceparents),
                             # How the engine's collector is set (services/sim_engine/
                             # __main__.py: quiet_collector), and what it has done.
                             "gc": {"threshold": list(gc.get_threshold()),
                                    "frozen": gc.get_freeze_count(),
                                    "collections": [g["collections"] for g in gc.get_stats()]}})

    async def sim_faults(self, request: Request) -> Response:
        """Test hook: set this engine's failure rate at run time (``{"fail_rate": 1.0}``),
        so one replica of a model can fail while the others do not."""
        try:
            rate = float((await request.json())["fail_rate"])
        except (ValueError, KeyError, TypeError):
            return error_response(400, 'body must be {"fail_rate": <0..1>}')
        if not 0.0 <= rate <= 1.0:
            return error_response(400, "fail_rate must be between 0 and 1")
        self.fail_rate = rate
        return JSONResponse({"fail_rate": rate})

    async def metrics(self, request: Request) -> Response:
        s = self.stats
        # Requests past --max-num-seqs count as waiting (for capacity), as vLLM reports them.
        running = min(s.running, self.config.max_num_seqs)
        gauges = Gauges(running=running, waiting=s.running - running,
                        max_num_seqs=self.config.max_num_seqs,
                        asleep=self.sleep_level is not None, prompt_tokens=s.prompt_tokens,
                        generation_tokens=s.generation_tokens, completed=s.completed)
        page = render(gauges, self._label_inner) + self.prefix_cache.metrics(self._label_inner)
        return Response(page, media_type=PROMETHEUS)



async def _http_error(request: Request, exc: Exception) -> Response:
    # FastAPI's shape for unknown paths and methods, which is what vLLM answers.
    if not isinstance(exc, HTTPException):
        raise exc
    return JSONResponse({"detail": exc.detail}, status_code=exc.status_code, headers=exc.headers)


def create_app(config: EngineConfig) -> Starlette:
    """The ASGI app of one simulated engine; its state lives on ``app.state.engine``."""
    engine = SimEngine(config)
    extra = ExtraApi(config, engine.stats)

    @asynccontextmanager
    async def lifespan(app: Starlette) -> AsyncIterator[None]:
        log("Application startup complete.")
        yield
        log("Shutting down.")

    routes = [
        Route("/health", engine.health, methods=["GET"]),
        Route("/version", engine.version, methods=["GET"]),
        Route("/metrics", engine.metrics, methods=["GET"]),
        Route("/v1/models", engine.models, methods=["GET"]),
        Route("/v1/chat/completions", engine.api(engine.chat), methods=["POST"]),
        Route("/v1/completions", engine.api(engine.completions), methods=["POST"]),
        Route("/v1/embeddings", engine.api(engine.embeddings), methods=["POST"]),
        *[Route(f"/{path}", engine.api(handler), methods=["POST"]) for path, handler in (
            ("v1/responses", extra.responses), ("v1/rerank", extra.rerank),
            ("rerank", extra.rerank), ("v1/score", extra.score), ("score", extra.score),
            ("tokenize", extra.tokenize), ("detokenize", extra.detokenize),
            ("pooling", extra.pooling), ("classify", extra.classify))],
        Route("/v1/audio/transcriptions",
              engine.form_api(partial(extra.audio, task="transcription")), methods=["POST"]),
        Route("/v1/audio/translations",
              engine.form_api(partial(extra.audio, task="translation")), methods=["POST"]),
        Route("/v1/load_lora_adapter", partial(load_adapter, engine.lora), methods=["POST"]),
        Route("/v1/unload_lora_adapter", partial(unload_adapter, engine.lora), methods=["POST"]),
        Route("/sleep", engine.sleep, methods=["POST"]),
        Route("/wake_up", engine.wake_up, methods=["POST"]),
        Route("/is_sleeping", engine.is_sleeping, methods=["GET"]),
        Route("/sim/stats", engine.sim_stats, methods=["GET"]),
        Route("/sim/fail_health", engine.fail_health, methods=["POST"]),
        Route("/sim/faults", engine.sim_faults, methods=["POST"]),
        Route("/sim/fault", engine.sim_fault, methods=["POST"]),
    ]
    app = Starlette(routes=routes, lifespan=lifespan,
                    exception_handlers={HTTPException: _http_error})
    app.state.engine = engine
    return app
