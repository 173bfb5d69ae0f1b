"""Command line of the simulated engine: vLLM's flags plus the knobs of the simulation.

Unknown flags exit with code 2 (argparse's usage error), as ``vllm serve`` does, so a bad
argument list fails the same way against the simulator as against the real engine.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True, slots=True)
class EngineConfig:
    model: str
    served_model_name: str
    host: str
    port: int
    uds: str | None
    sim_port: int | None
    max_model_len: int
    max_num_seqs: int
    seed: int | None
    api_key: str | None
    enable_sleep_mode: bool
    startup_delay: float
    ttft: float
    itl: float
    fail_rate: float
    fail_startup: bool
    sleep_delay: float
    wake_delay_l1: float
    wake_delay_l2: float
    embedding_dim: int
    max_tokens_default: int
    spawn_child: bool = False
    fail_health_after: float | None = None
    # Room of the simulated prefix cache, in 64-character blocks (0: no prefix caching).
    prefix_cache_blocks: int = 4096
    enable_lora: bool = False
    max_loras: int = 1
    lora_load_delay: float = 0.0
    scheduling_policy: str = "fcfs"
    enforce_max_num_seqs: bool = False


def _add_vllm_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True)
    parser.add_argument("--served-model-name", default=None)
    parser.add_argument("--host", default="127.0.0.1")
    # vLLM's default port; unused with --uds, as in vLLM.
    parser.add_argument("--port", type=int, default=8000)
    # vLLM's: serve on this Unix socket instead of host:port (the worker's default).
    parser.add_argument("--uds", default=None)
    parser.add_argument("--gpu-memory-utilization", type=float, default=0.9)
    parser.add_argument("--max-model-len", type=int, default=4096)
    parser.add_argument("--tensor-parallel-size", type=int, default=1)
    parser.add_argument("--dtype", default="auto")
    parser.add_argument("--enable-sleep-mode", action="store_true")
    parser.add_argument("--trust-remote-code", action="store_true")
    parser.add_argument("--enable-prefix-caching", action="store_true")
    parser.add_argument("--max-num-seqs", type=int, default=256)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--api-key", default=None)
    parser.add_argument("--enable-lora", action="store_true")
    parser.add_argument("--max-loras", type=int, default=1)
    parser.add_argument("--max-lora-rank", type=int, default=16)
    parser.add_argument("--scheduling-policy", choices=("fcfs", "priority"), default="fcfs")


def _add_sim_flags(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--startup-delay", type=float, default=0.0)
    parser.add_argument("--ttft", type=float, default=0.0)
    parser.add_argument("--itl", type=float, default=0.0)
    parser.add_argument("--fail-rate", type=float, default=0.0)
    parser.add_argument("--fail-startup", action="store_true")
    parser.add_argument("--sleep-delay", type=float, default=0.05)
    parser.add_argument("--wake-delay-l1", type=float, default=0.2)
    parser.add_argument("--wake-delay-l2", type=float, default=1.0)
    parser.add_argument("--embedding-dim", type=int, default=32)
    parser.add_argument("--max-tokens-default", type=int, default=16)
    # vLLM runs its engine core in a child process of the API server; this mimics that
    # layout so process-group and orphan handling are tested against it: the child ignores
    # its parent's death, renames itself and has an empty environment, as vLLM's EngineCore
    # (setproctitle) does.
    parser.add_argument("--spawn-child", action="store_true")
    # After this many seconds the simulated engine core "dies" behind a live API server, as
    # vLLM's does: /health answers 503 and generation requests 500 (also: POST /sim/fault).
    parser.add_argument("--fail-health-after", type=float, default=None)
    parser.add_argument("--prefix-cache-blocks", type=int, default=4096)
    # Seconds a POST /v1/load_lora_adapter takes (reading the adapter's weights).
    parser.add_argument("--lora-load-delay", type=float, default=0.1)
    # At most --max-num-seqs requests generate at once, the others wait (vLLM's behaviour;
    # by default the simulator runs every request at once and only reports the excess as
    # waiting), so a saturated replica's latency grows with its load.
    parser.add_argument("--enforce-max-num-seqs", action="store_true")
    # Also serve on this loopback port (beside --uds or --port): benchmarks measure clients
    # talking to the engine itself over TCP (bench/README.md) beside the pool's own path.
    parser.add_argument("--sim-port", type=int, default=None)


def build_parser() -> argparse.ArgumentParser:
    # allow_abbrev=False: a misspelt flag must fail, not silently match a longer one.
    parser = argparse.ArgumentParser(
        prog="python -m services.sim_engine",
        description="Simulated vLLM OpenAI-compatible server (no GPU).",
        allow_abbrev=False,
    )
    _add_vllm_flags(parser)
    _add_sim_flags(parser)
    return parser


def _check(parser: argparse.ArgumentParser, ns: argparse.Namespace) -> None:
    delays = ("startup_delay", "ttft", "itl", "sleep_delay", "wake_delay_l1", "wake_delay_l2",
              "fail_health_after", "lora_load_delay")
    for name in delays:
        if (getattr(ns, name) or 0) < 0:
            parser.error(f"--{name.replace('_', '-')} must be >= 0")
    if not 0.0 <= ns.fail_rate <= 1.0:
        parser.error("--fail-rate must be between 0 and 1")
    if not 0 <= ns.port <= 65535:
        parser.error("--port must be between 0 and 65535")
    if ns.sim_port is not None and not 1 <= ns.sim_port <= 65535:
        parser.error("--sim-port must be between 1 and 65535")
    positive = ("max_model_len", "max_num_seqs", "embedding_dim", "max_tokens_default",
                "max_loras")
    for name in positive:
        if getattr(ns, name) < 1:
            parser.error(f"--{name.replace('_', '-')} must be >= 1")


def parse_args(argv: Sequence[str] | None = None) -> EngineConfig:
    """Parse ``argv``; exits with code 2 on an unknown flag or a bad value."""
    parser = build_parser()
    ns = parser.parse_args(argv)
    _check(parser, ns)
    return EngineConfig(
        model=ns.model,
        served_model_name=ns.served_model_name or ns.model,
        host=ns.host,
        port=ns.port,
        uds=ns.uds,
        sim_port=ns.sim_port,
        max_model_len=ns.max_model_len,
        max_num_seqs=ns.max_num_seqs,
        seed=ns.seed,
        api_key=ns.api_key or None,
        enable_sleep_mode=ns.enable_sleep_mode,
        startup_delay=ns.startup_delay,
        ttft=ns.ttft,
        itl=ns.itl,
        fail_rate=ns.fail_rate,
        fail_startup=ns.fail_startup,
        sleep_delay=ns.sleep_delay,
        wake_delay_l1=ns.wake_delay_l1,
        wake_delay_l2=ns.wake_delay_l2,
        embedding_dim=ns.embedding_dim,
        spawn_child=ns.spawn_child,
        fail_health_after=ns.fail_health_after,
        max_tokens_default=ns.max_tokens_default,
        prefix_cache_blocks=max(0, ns.prefix_cache_blocks),
        enable_lora=ns.enable_lora,
        max_loras=ns.max_loras,
        lora_load_delay=ns.lora_load_delay,
        scheduling_policy=ns.scheduling_policy,
        enforce_max_num_seqs=ns.enforce_max_num_seqs,
    )


def log(message: str, level: str = "INFO") -> None:
    """A vLLM-looking log line; flushed at once because the worker tails this log."""
    stamp = time.strftime("%m-%d %H:%M:%S")
    stream = sys.stderr if level in ("ERROR", "WARNING") else sys.stdout
    print(f"{level} {stamp} [sim_engine] {message}", file=stream, flush=True)


def load_model(config: EngineConfig) -> bool:
    """Pretend to load weights (before the port is bound); False on a simulated failure."""
    log(f"loading model {config.model!r} (served as {config.served_model_name!r}) ...")
    if config.startup_delay > 0:
        time.sleep(config.startup_delay)
    if config.fail_startup:
        print("Traceback (most recent call last):", file=sys.stderr)
        print(f'  File "{__file__}", line 1, in load_model', file=sys.stderr)
        print("RuntimeError: simulated start-up failure", file=sys.stderr, flush=True)
        return False
    log(f"model loaded; pid {os.getpid()}")
    return True
