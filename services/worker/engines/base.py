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
from shared.models import ModelSpec


@dataclass(frozen=True)
class Launch:
    argv: list[str]
    env: dict[str, str] = field(default_factory=dict)


class EngineDriver(Protocol):
    name: str

    def unavailable_reason(self) -> str | None:
        """None when this machine can run the engine, else why not."""

    def launch(self, spec: ModelSpec, port: int, gpus: list[int]) -> Launch:
        """The argument list (never a shell string) and extra environment."""


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

    def start(self) -> None:
        env = {**os.environ, **self.launch.env}
        self.proc = procs.spawn(
            self.launch.argv, log_path=self.log_path, env=env, die_with_parent=True
        )

    def exit_code(self) -> int | None:
        return self.proc.poll() if self.proc else None

    async def health(self, client: httpx.AsyncClient) -> bool:
        try:
            r = await client.get(f"{self.base_url}/health", timeout=2.0)
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

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log_path, lines)
