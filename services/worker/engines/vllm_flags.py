"""The installed vLLM's version and the flags its own argument parser accepts.

Read once per worker process by running vLLM's parser builder (``make_arg_parser`` on a
``FlexibleArgumentParser``, as ``vllm serve`` and the API server do) in a subprocess with the
engine's interpreter and environment: importing vLLM takes seconds and pins its own torch, so
it never runs inside the worker. About 20 s on a busy 2-core machine; it runs in the
background and only a vLLM launch waits for it.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

from services.worker.engines.environment import engine_env
from shared import procs

_MARK = "SVLLM-VLLM-FLAGS "
# Module paths moved between vLLM releases (0.32: vllm.entrypoints.launchers.cli_args).
PROBE_CODE = f"""
import json
import vllm
try:
    from vllm.utils.argparse_utils import FlexibleArgumentParser
except ImportError:
    from vllm.utils import FlexibleArgumentParser
try:
    from vllm.entrypoints.launchers.cli_args import make_arg_parser
except ImportError:
    from vllm.entrypoints.openai.cli_args import make_arg_parser
parser = make_arg_parser(FlexibleArgumentParser())
flags = sorted({{o for a in parser._actions for o in a.option_strings}})
print({_MARK!r} + json.dumps({{"version": vllm.__version__, "flags": flags}}), flush=True)
"""


@dataclass(frozen=True)
class VllmInfo:
    version: str
    flags: frozenset[str]


class ProbeError(RuntimeError):
    """vLLM's argument parser could not be read; the message says why."""


def python_of(prefix: list[str]) -> str | None:
    """The interpreter behind a vLLM launch prefix: ``python -m ...``, or the shebang of the
    ``vllm`` console script."""
    if len(prefix) >= 3 and prefix[1] == "-m":
        return prefix[0]
    script = shutil.which(prefix[0])
    if script is None:
        return None
    try:
        with open(script, "rb") as f:
            first = f.readline().decode("utf-8", "replace").strip()
    except OSError:
        return None
    return first[2:].split()[0] if first.startswith("#!") and len(first) > 2 else None


def probe(prefix: list[str], log_path: Path, env_passthrough: tuple[str, ...],
          timeout_s: float = 300.0,
          on_spawn: Callable[[subprocess.Popen[bytes]], None] | None = None) -> VllmInfo:
    """Run vLLM's parser builder once; raises ProbeError (its output is in ``log_path``).
    ``on_spawn`` gets the process, so that a worker shutting down can end it."""
    python = python_of(prefix)
    if python is None:
        raise ProbeError(f"cannot tell which Python runs {prefix[0]!r}")
    log_path.parent.mkdir(parents=True, exist_ok=True)
    log_path.unlink(missing_ok=True)
    env = engine_env(os.environ, {}, env_passthrough)
    # Dies with the worker (an interpreter exiting mid-reading leaves nothing behind).
    proc = procs.spawn([python, "-c", PROBE_CODE], log_path=log_path, env=env,
                       die_with_parent=True)
    if on_spawn is not None:
        on_spawn(proc)
    try:
        code = proc.wait(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        procs.stop(proc, 1.0)
        raise ProbeError(f"reading vLLM's arguments took over {timeout_s:.0f}s") from None
    finally:
        procs.stop(proc, 1.0)
    return parse_probe_output(log_path.read_text(errors="replace"), code, log_path)


def parse_probe_output(output: str, code: int, log_path: Path) -> VllmInfo:
    for line in output.splitlines():
        if line.startswith(_MARK):
            try:
                data = json.loads(line[len(_MARK):])
                return VllmInfo(str(data["version"]), frozenset(map(str, data["flags"])))
            except (ValueError, KeyError, TypeError) as e:
                raise ProbeError(f"garbled reading of vLLM's arguments: {e}") from None
    raise ProbeError(f"vLLM's argument parser could not be read (exit code {code}); "
                     f"see {log_path}")
