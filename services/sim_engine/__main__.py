"""Entry point: ``python -m services.sim_engine --model M (--port P | --uds PATH) [...]``.

Same life cycle as ``vllm serve``: load (the start-up delay) before the port is bound, so a
bound port means ready; a failed load exits 1; SIGTERM shuts down within about two seconds.
"""

from __future__ import annotations

import contextlib
import gc
import os
import socket
import subprocess
import sys
from collections.abc import Sequence

import uvicorn

from services.sim_engine.cli import EngineConfig, load_model, log, parse_args
from services.sim_engine.server import create_app

# The young generation is collected every this many allocations, as in the pool's own
# services (GC_GEN0_THRESHOLD's default, shared/settings.py). quiet_collector below is
# shared.service.tune_gc's twin, not a call to it: the engine imports none of the pool's
# code (shared.service would bring in FastAPI and the Redis store), as vLLM would not.
GEN0_THRESHOLD = 20_000


def quiet_collector() -> int:
    """Freeze what start-up made out of the cyclic collector and collect the young generation
    every :data:`GEN0_THRESHOLD` allocations; return how many objects were frozen.

    vLLM freezes its start-up heap too (``freeze_gc_heap``). With Python's defaults this
    engine, holding 1,000 streams, paused for collections of up to 75 ms about once a
    second, and every proxy measured in front of it inherited the pauses as its own TTFT
    tail (docs/performance.md, "Many slow streams")."""
    gc.collect()
    gc.freeze()
    _, gen1, gen2 = gc.get_threshold()
    gc.set_threshold(GEN0_THRESHOLD, gen1, gen2)
    return gc.get_freeze_count()


class _Server(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, where: list[str],
                 uds: str | None = None) -> None:
        super().__init__(config)
        self.where = where  # what it listens on, for the log line the worker reads
        self.uds = uds

    async def shutdown(self, sockets: list[socket.socket] | None = None) -> None:
        await super().shutdown(sockets)
        if self.uds is not None:  # here: uvicorn then re-raises the signal that stopped it
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.uds)

    async def startup(self, sockets: list[socket.socket] | None = None) -> None:
        await super().startup(sockets)
        if self.started:
            frozen = quiet_collector()  # start-up is over: what it made lives on
            log(f"Freezing GC: {frozen} start-up objects; young generation every "
                f"{GEN0_THRESHOLD} allocations")
            # uvicorn logs at warning level here (its access log is too costly), so say what
            # its own info lines would have said; the worker tails them.
            for where in self.where:
                log(f"Uvicorn running on {where} (Press CTRL+C to quit)")


def _tcp(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((host, port))
    return sock


def _listeners(config: EngineConfig) -> tuple[list[socket.socket], list[str]]:
    """What it serves on, and how to say so: the Unix socket with --uds (vLLM's flag: host and
    port are then unused; a stale file from an earlier run is removed first, where vLLM's bind
    would fail: the worker never reuses a path), else host:port; and 127.0.0.1:--sim-port
    beside either when given."""
    if config.uds is not None:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(config.uds)
        uds = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        uds.bind(config.uds)
        out, where = [uds], [f"unix socket {config.uds}"]
    else:
        out, where = [_tcp(config.host, config.port)], [f"http://{config.host}:{config.port}"]
    if config.sim_port is not None:
        out.append(_tcp("127.0.0.1", config.sim_port))
        where.append(f"http://127.0.0.1:{config.sim_port}")
    return out, where


def serve(config: EngineConfig) -> int:
    uv_config = uvicorn.Config(
        create_app(config),
        host=config.host,
        port=config.port,
        loop="uvloop",
        http="httptools",
        log_level="warning",
        access_log=False,
        timeout_graceful_shutdown=1,
    )
    log(f"Started server process [{os.getpid()}]")
    if config.uds is None and config.sim_port is None:
        server = _Server(uv_config, [f"http://{config.host}:{config.port}"])
        server.run()
    else:
        sockets, where = _listeners(config)
        server = _Server(uv_config, where, config.uds)
        server.run(sockets=sockets)
    return 0 if server.started else 1


# The child renames itself (what /proc/PID/comm and ps show) like vLLM's EngineCore, then
# waits forever: it does not watch its parent, so it outlives a SIGKILLed API server.
_CORE_CODE = """
import ctypes, time
ctypes.CDLL(None).prctl(15, b"SIM::EngineCore", 0, 0, 0)  # PR_SET_NAME
while True:
    time.sleep(60)
"""


def spawn_engine_core() -> subprocess.Popen[bytes]:
    """A child in the same process group that outlives a SIGKILLed parent, like vLLM's.

    Its environment is empty (vLLM's setproctitle overwrites the environment area, so
    /proc/PID/environ of an EngineCore shows nothing): markers in the environment cannot
    find it."""
    return subprocess.Popen([sys.executable, "-c", _CORE_CODE], stdin=subprocess.DEVNULL,
                            env={})


def main(argv: Sequence[str] | None = None) -> int:
    config = parse_args(argv)
    if not load_model(config):
        return 1
    core = spawn_engine_core() if config.spawn_child else None
    try:
        return serve(config)
    finally:
        if core is not None:
            core.terminate()
            core.wait(timeout=5)


if __name__ == "__main__":
    sys.exit(main())
