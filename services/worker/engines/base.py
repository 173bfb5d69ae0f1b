"""The engine interface: how to launch one, and a running engine process.

An engine is a process serving vLLM's HTTP API on a Unix socket in a directory only this
worker's user can enter (vLLM's ``--uds``; :class:`EngineSockets`), or on 127.0.0.1:<port>
for an engine that cannot (or with ``ENGINE_SOCKETS=tcp``). Drivers only build the launch
(argument list and environment); :class:`EngineProcess` runs it the same way for all.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import logging
import os
import signal
import socket
import stat
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

import httpx

from services.worker import keeper
from services.worker.engines.environment import engine_env
from services.worker.engines.metrics import engine_load
from services.worker.ownership import EngineRecord, KeeperOptions, Launcher, Owner
from shared import private_dirs, procs
from shared.models import Assignment, ModelSpec
from shared.wire import unix_url

logger = logging.getLogger(__name__)


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

    async def prepare(self) -> None:
        """Learn what the installed engine needs known before a launch (vLLM: its version
        and flags). Awaited before every launch; cheap once done."""

    def unix_socket(self) -> bool:
        """Whether the engine can serve on a Unix socket (vLLM's ``--uds``); asked after
        :meth:`prepare`."""

    def launch(self, spec: ModelSpec, port: int, placed: Assignment,
               uds: str | None = None) -> Launch:
        """The argument list (never a shell string) and extra environment for ``spec`` on
        the GPUs (and memory share) of its assignment, serving on ``uds`` when given (only
        where :meth:`unix_socket`), else on 127.0.0.1:``port``."""


class EngineExited(Exception):
    """The engine process ended while we waited for it to become healthy."""


class EngineSockets:
    """Where this worker's engines put their Unix sockets: a private directory of its own
    (shared.private_dirs: mode 0700, so only the worker's user can connect; over loopback TCP
    any local user could, and vLLM's /sleep, /wake_up and /collective_rpc check no token),
    made on first use. Removed with what is left in it when the worker stops (:meth:`close`);
    those of workers that died without a stop, when the next one makes its own."""

    PREFIX = "svllm-engines-"

    def __init__(self, base: str | None = None) -> None:
        self.base = str(private_dirs.short_root(self.PREFIX, base))
        self.dir: str | None = None
        # Earlier directories still ours whose mode someone changed: their engines keep
        # serving there (held, so no sweep removes them) until the worker stops.
        self._kept: list[Path] = []
        self._n = itertools.count(1)

    def new_path(self) -> str:
        if self.dir is None or not self._still_ours(self.dir):
            # None yet, gone (a /tmp cleaner), or no longer private: its name is public
            # (records, logs), so one in its place may be someone else's; a fresh one instead.
            if self.dir is not None:
                old = Path(self.dir)
                if private_dirs.owns(old):
                    self._kept.append(old)  # the same directory, opened up: kept held
                else:
                    private_dirs.release(old)  # gone: what is there now is not ours
            private_dirs.remove_stale(self.PREFIX, Path(self.base))
            self.dir = str(private_dirs.make(self.PREFIX, Path(self.base)))
        return os.path.join(self.dir, f"{next(self._n)}.sock")

    @staticmethod
    def _still_ours(path: str) -> bool:
        """A real directory (not a link), ours, that nobody else may enter."""
        try:
            st = os.lstat(path)
        except OSError:
            return False
        return (stat.S_ISDIR(st.st_mode) and st.st_uid == os.getuid()
                and stat.S_IMODE(st.st_mode) == 0o700)

    def close(self) -> None:
        for d in self._kept:
            private_dirs.remove(d)
        self._kept.clear()
        if self.dir is not None:
            private_dirs.remove(Path(self.dir))
            self.dir = None


KEEPER_PATH = str(Path(keeper.__file__).resolve())
# How long a keeper may take to start its engine and say so (a Python start on a busy host).
_KEEPER_REPORT_TIMEOUT_S = 60.0


class EngineProcess:
    """One engine, in a process group of its own under its keeper (services.worker.keeper),
    serving on a Unix socket (``uds``) or 127.0.0.1:``port``. The keeper ends the engine's
    whole process tree when asked, when the engine leader exits, and when this worker
    process dies."""

    def __init__(self, launch: Launch, port: int, log_path: Path,
                 uds: str | None = None) -> None:
        self.launch = launch
        self.port = port
        self.uds = uds
        self.log_path = log_path
        self.keeper: subprocess.Popen[bytes] | None = None
        self.record: EngineRecord | None = None
        self._owner: Owner | None = None
        self._sock: socket.socket | None = None
        self._inbox = b""
        # Set from the keeper's "exited" message: the leader is gone, its leftovers may not be.
        self._leader_code: int | None = None
        # The start, running in a thread: stop() waits for it (see start()).
        self._starting: asyncio.Future[None] | None = None
        # The request path's address (shared.wire); control calls go through httpx, which
        # reaches a Unix socket through a client of its own (:meth:`http`).
        self.base_url = unix_url(uds) if uds else f"http://127.0.0.1:{port}"
        self._url = "http://localhost" if uds else self.base_url
        self._http: httpx.AsyncClient | None = None
        # (device, inode) of the socket file the engine bound, once seen; and why the
        # engine can no longer be reached there, once it cannot (:meth:`socket_lost`).
        self._socket_id: tuple[int, int] | None = None
        self.lost: str | None = None

    @property
    def address(self) -> str:
        """Where it serves, for logs and records: ``unix:PATH`` or ``127.0.0.1:PORT``."""
        return f"unix:{self.uds}" if self.uds else f"127.0.0.1:{self.port}"

    def http(self, client: httpx.AsyncClient) -> httpx.AsyncClient:
        """The client for control calls: ``client`` (the worker's) for an engine on a port,
        one of the engine's own for one on a Unix socket (closed by :meth:`stop`)."""
        if self.uds is None:
            return client
        if self._http is None:
            self._http = httpx.AsyncClient(transport=httpx.AsyncHTTPTransport(uds=self.uds),
                                           timeout=client.timeout)
        return self._http

    async def get(self, client: httpx.AsyncClient, path: str, timeout_s: float
                  ) -> httpx.Response:
        return await self.http(client).get(f"{self._url}{path}", timeout=timeout_s)

    async def post(self, client: httpx.AsyncClient, path: str, timeout_s: float,
                   json: dict[str, object] | None = None) -> httpx.Response:
        return await self.http(client).post(f"{self._url}{path}", json=json, timeout=timeout_s)

    @property
    def pid(self) -> int | None:
        """The engine's pid, which is also its process group id."""
        return self.record.engine_pid if self.record else None

    async def start(self, owner: Owner, alias: str, opts: KeeperOptions) -> None:
        """Start the keeper and through it the engine; record the engine's processes in the
        state dir. Raises EngineExited when the keeper cannot start the engine.

        Shielded: when the caller is cancelled (the instance was stopped meanwhile) the
        thread still runs to its end, and :meth:`stop` waits for it before stopping, so an
        engine can never come up after its stop and be left unowned."""
        self._starting = asyncio.ensure_future(
            asyncio.to_thread(self._start, owner, alias, opts))
        # Whoever awaits it sees its error; this keeps an unawaited one from being logged.
        self._starting.add_done_callback(lambda f: f.cancelled() or f.exception())
        await asyncio.shield(self._starting)

    def _start(self, owner: Owner, alias: str, opts: KeeperOptions) -> None:
        ours, theirs = socket.socketpair()
        argv = [sys.executable, "-I", KEEPER_PATH, "--fd", str(theirs.fileno()),
                "--grace", f"{opts.stop_grace_s:g}", "--orphan-grace", f"{opts.orphan_grace_s:g}",
                # The engine leader also dies with its keeper (SIGKILL), should that be killed.
                "--", *procs.die_with_parent_prefix(), *self.launch.argv]
        env = engine_env(os.environ, self.launch.env, opts.env_passthrough)
        try:
            self.keeper = procs.spawn(argv, log_path=self.log_path, env=env,
                                      pass_fds=(theirs.fileno(),))
        finally:
            theirs.close()  # the keeper holds the only other end: EOF there = we are gone
        self._owner = owner
        # Only this thread reads the socket until the report is in: a read from the event
        # loop (exit_code) on a socket with a timeout would wait for data, not return.
        report = self._read_report(ours)
        self._sock = ours
        keeper_id = Launcher(self.keeper.pid, procs.proc_start(self.keeper.pid) or 0)
        engine_id = Launcher(int(report["pid"]), int(report["start"]))
        self.record = owner.record(alias, keeper_id, int(report["pgid"]), engine_id)
        owner.write(self.record)

    def _read_report(self, sock: socket.socket) -> dict[str, int]:
        assert self.keeper is not None
        sock.settimeout(_KEEPER_REPORT_TIMEOUT_S)
        data = b""
        try:
            while b"\n" not in data:
                chunk = sock.recv(4096)
                if not chunk:
                    break
                data += chunk
        except TimeoutError:
            pass
        finally:
            sock.settimeout(None)
        if b"\n" not in data:
            try:  # end-of-file: the keeper is exiting (it could not start the engine)
                code: int | None = self.keeper.wait(timeout=5)
            except subprocess.TimeoutExpired:  # silent: it must not linger either
                code = None
                self.keeper.kill()
                self.keeper.wait(timeout=10)
            sock.close()
            raise EngineExited(f"engine keeper exited with code {code} before the engine ran"
                               if code is not None else "engine keeper did not report")
        first, self._inbox = data.split(b"\n", 1)
        self._parse_inbox()  # the engine may have exited already
        report: dict[str, int] = json.loads(first)
        return report

    def exit_code(self) -> int | None:
        """The engine's exit code (128 + N for signal N) once its leader has exited (the
        keeper says so at once, then ends what is left). One non-blocking read."""
        if self.keeper is None:
            return None
        code = self.keeper.poll()
        if code is not None:
            return code
        if self._leader_code is None and self._sock is not None:
            self._read_events()
        return self._leader_code

    def _read_events(self) -> None:
        assert self._sock is not None
        try:
            self._inbox += self._sock.recv(4096, socket.MSG_DONTWAIT)
        except OSError:  # nothing to read (BlockingIOError) or the keeper is gone
            return
        self._parse_inbox()

    def _parse_inbox(self) -> None:
        *lines, self._inbox = self._inbox.split(b"\n")
        for line in lines:
            with contextlib.suppress(ValueError):
                event = json.loads(line)
                if event.get("event") == "exited":
                    self._leader_code = int(event["code"])

    async def health(self, client: httpx.AsyncClient) -> bool:
        return await self.health_status(client) is True

    async def health_status(self, client: httpx.AsyncClient) -> bool | None:
        """True: healthy; False: an error answer, or no connection; None: no answer in time
        (hung, or only too busy to answer within the 2 s)."""
        if self.socket_lost():
            return False
        try:
            r = await self.get(client, self.launch.health_path, 2.0)
        except httpx.TimeoutException:
            return None
        except httpx.HTTPError:
            return False
        return r.status_code == 200

    def socket_lost(self) -> bool:
        """Whether the engine's socket file was removed or replaced since it was bound (a
        temporary-file cleaner, say). The engine then refuses every new connection while
        the pooled ones, a health check's included, still work: without this check it
        would pass its health checks while new requests fail. Its instance then fails the
        health checks and is restarted on a fresh socket."""
        if self.uds is None:
            return False
        try:
            st = os.stat(self.uds)
            ident = (st.st_dev, st.st_ino) if stat.S_ISSOCK(st.st_mode) else None
        except OSError:
            ident = None
        if self._socket_id is None:
            # Not bound yet (a start), or bound now: only the engine creates this path, in
            # a directory only this worker's user can write.
            self._socket_id = ident
            return False
        if ident == self._socket_id:
            return False
        if self.lost is None:
            self.lost = (f"its socket file {self.uds} was removed or replaced (a temporary-"
                         "file cleaner?): new connections cannot reach it")
            logger.warning("engine (pid %s): %s", self.pid, self.lost)
        return True

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
        """Have the keeper end the engine's tree (SIGTERM, SIGKILL after its grace); returns
        the engine's exit code. Safe to call twice."""
        if self._starting is not None and not self._starting.done():
            with contextlib.suppress(Exception):  # a failed start left nothing to stop
                await asyncio.shield(self._starting)
        await self._close_http()
        if self.keeper is None:
            return None
        code = await asyncio.to_thread(self._stop, grace_s)
        if self.uds is not None and self.gone():  # a killed engine leaves its socket file
            with contextlib.suppress(OSError):
                os.unlink(self.uds)
        await self._close_http()  # again: one made by a call that came during the stop
        return code

    async def _close_http(self) -> None:
        if self._http is not None:
            http, self._http = self._http, None
            await http.aclose()

    def _stop(self, grace_s: float) -> int | None:
        assert self.keeper is not None
        if self.keeper.poll() is None:
            if self._sock is not None:
                with contextlib.suppress(OSError):
                    self._sock.sendall(b"stop\n")
            else:  # still starting: SIGTERM is a stop to the keeper too
                self.keeper.send_signal(signal.SIGTERM)
            try:
                self.keeper.wait(timeout=grace_s + 10)
            except subprocess.TimeoutExpired:
                # A keeper that does not answer: do its work from here.
                logger.warning("engine keeper %d did not stop in time: killing", self.keeper.pid)
                if self.pid:
                    procs.signal_group(self.pid, signal.SIGKILL)
                self.keeper.kill()
                self.keeper.wait(timeout=10)
        if self.pid and procs.group_alive(self.pid):
            procs.signal_group(self.pid, signal.SIGKILL)
            procs.wait_group_gone(self.pid, 5.0)
        if self._sock is not None:
            self._sock.close()
            self._sock = None
        if self._owner is not None and self.record is not None and self.gone():
            self._owner.remove(self.record.alias)
        return self.keeper.returncode

    def gone(self) -> bool:
        """True once no process of the engine is left (its GPU memory is free)."""
        if self._starting is not None and not self._starting.done():
            return False  # a keeper and an engine may be on their way
        if self.keeper is None:
            return True
        return self.keeper.poll() is not None and not (self.pid and procs.group_alive(self.pid))

    async def sleep(self, client: httpx.AsyncClient, level: int, timeout_s: float) -> None:
        """vLLM sleep mode: level 1 offloads weights to host RAM, level 2 discards them."""
        r = await self.post(client, f"/sleep?level={level}", timeout_s)
        r.raise_for_status()
        if not await self.is_sleeping(client):
            raise RuntimeError("engine accepted /sleep but does not report sleeping")

    async def wake(self, client: httpx.AsyncClient, timeout_s: float) -> None:
        r = await self.post(client, "/wake_up", timeout_s)
        r.raise_for_status()
        if await self.is_sleeping(client):
            raise RuntimeError("engine accepted /wake_up but still reports sleeping")

    async def is_sleeping(self, client: httpx.AsyncClient) -> bool:
        r = await self.get(client, "/is_sleeping", 10.0)
        r.raise_for_status()
        return bool(r.json().get("is_sleeping"))

    async def warm_up(self, client: httpx.AsyncClient, served_name: str, timeout_s: float) -> str:
        """One one-token request before the instance takes traffic. Returns '' or a note
        (an embedding-only model refuses completions; that is not a failure)."""
        body: dict[str, object] = {"model": served_name, "prompt": "Hi", "max_tokens": 1}
        r = await self.post(client, "/v1/completions", timeout_s, json=body)
        return "" if r.status_code < 400 else f"warm-up answered {r.status_code}"

    async def load(self, client: httpx.AsyncClient) -> float | None:
        """Running + waiting requests from the engine's Prometheus /metrics (exact names of
        vLLM's, llama.cpp's or SGLang's gauges; see engines.metrics)."""
        try:
            r = await self.get(client, "/metrics", 2.0)
        except httpx.HTTPError:
            return None
        if r.status_code != 200:
            return None
        try:
            return engine_load(r.text)
        except ValueError:
            logger.warning("unparsable /metrics from the engine on %s", self.address)
            return None

    def log_tail(self, lines: int = 30) -> str:
        return procs.tail(self.log_path, lines)
