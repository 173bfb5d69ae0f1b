"""The engine interface: how to launch one, and a running engine process.

An engine is a process serving vLLM's HTTP API on 127.0.0.1:<port>. Drivers only build the
launch (argument list and environment); :class:`EngineProcess` runs it the same way for all.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from shared import procs
from shared.models import Assignment, ModelSpec


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)
    # Answers 200 once the engine serves (llama-cpp-python's server has no /health).
    health_path: str = "/health"
    # The engine refuses an X-Request-ID that is not a UUID (llama-cpp-python's server answers
    # 400): the proxy then gives it a fresh one instead of the client's.
    uuid_request_ids: bool = False


class EngineDriver(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the engine, else why not."""

    def launch(self, spec: ModelSpec, port: int, placed: Assignment) -> Launch:
        """The argument list (never a shell string) and extra environment for ``spec`` on
        the GPUs (and memory share) of its assignment."""


ORPHAN_MARKER = "SVLLM_ENGINE_OF"


class EngineExited(Exception):
    """The engine process ended while we waited for it to become healthy."""


class EngineProcess:
    """One engine process in its own process group, bound to 127.0.0.1."""

    def __init__(self, launch: Launch, port: int, log_path: Path) -> None:
        self.launch = launch
        self.port = port
        self.log_path = log_path
        self.proc: subprocess.Popen[bytes] | None = None
        self.base_url = f"http://127.0.0.1:{port}"

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    def start(self, marker: str) -> None:
        # The marker is inherited by every process the engine spawns, so a restarted worker
        # can find what a crashed one left behind (see services.worker.orphans).
        env = {**os.environ, **self.launch.env, ORPHAN_MARKER: marker}
        self.proc = procs.spawn(
            self.launch.argv, log_path=self.log_path, env=env, die_with_parent=True
        )

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc else None

    async def health(self, client: httpx.AsyncClient) -> bool:
        try:
            r = await client.get(f"{self.base_url}{self.launch.health_path}", timeout=2.0)
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    async def wait_ready(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        """Return once /health answers 200. Raises EngineExited or TimeoutError."""
        deadline = time.monotonic() + timeout_s
        delay = 0.05
        while time.monotonic() < deadline:
            code = self.exit_code()
            if code is not None:
                raise EngineExited(f"engine exited with code {code} during start-up")
            if await self.health(client):
                return
            await asyncio.sleep(delay)
            delay = min(delay * 1.5, 0.5)
        raise TimeoutError(f"engine not healthy after {timeout_s:.0f}s")

    async def stop(self, grace_s: float) -> int | None:
        if self.proc is None:
            return None
        return await asyncio.to_thread(procs.stop, self.proc, grace_s)

    def gone(self) -> bool:
        """True once no process of the engine's group is left (its GPU memory is free)."""
        return self.proc is None or not procs.group_alive(self.proc.pid)

    async def _post(self, client: httpx.AsyncClient, path: str, timeout_s: float,
                    json: dict[str, object] | None = None) -> httpx.Response:
        return await client.post(f"{self.base_url}{path}", json=json, timeout=timeout_s)

    async def sleep(self, client: httpx.AsyncClient, level: int, timeout_s: float) -> None:
        """vLLM sleep mode: level 1 offloads weights to host RAM, level 2 discards them."""
        r = await self._post(client, f"/sleep?level={level}", timeout_s)
        r.raise_for_status()
        if not await self.is_sleeping(client):
            raise RuntimeError("engine accepted /sleep but does not report sleeping")

    async def wake(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        r = await self._post(client, "/wake_up", timeout_s)
        r.raise_for_status()
        if await self.is_sleeping(client):
            raise RuntimeError("engine accepted /wake_up but still reports sleeping")

    async def is_sleeping(self, client: httpx.AsyncClient) -> bool:
        r = await client.get(f"{self.base_url}/is_sleeping", timeout=10.0)
        r.raise_for_status()
        return bool(r.json().get("is_sleeping"))

    async def warm_up(self, client: httpx.AsyncClient, served_name: str, timeout_s: float) -> str:
        """One one-token request before the instance takes traffic. Returns '' or a note
        (an embedding-only model refuses completions; that is not a failure)."""
        body: dict[str, object] = {"model": served_name, "prompt": "Hi", "max_tokens": 1}
        r = await self._post(client, "/v1/completions", timeout_s, json=body)
        return "" if r.status_code < 400 else f"warm-up answered {r.status_code}"

    async def load(self, client: httpx.AsyncClient) -> float | None:
        """Running + waiting requests from the engine's Prometheus /metrics (vLLM's names)."""
        try:
            r = await client.get(f"{self.base_url}/metrics", timeout=2.0)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        total, seen = 0.0, False
        for line in r.text.splitlines():
            if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
                total += float(line.rsplit(" ", 1)[-1])
                seen = True
        return total if seen else None

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log_path, lines)
