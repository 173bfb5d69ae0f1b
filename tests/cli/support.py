"""Running the real ``svllm`` (``python -m services.cli``) against a real pool."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass

from tests.support import ROOT, Proc


@dataclass
class Result:
    code: int
    out: str
    err: str


def cli_env(router: Proc, token: str | None) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SVLLM_")}
    env |= {"SVLLM_URL": router.url, "COLUMNS": "200", "NO_COLOR": "1", "TERM": "dumb"}
    if token:
        env["SVLLM_ADMIN_TOKEN"] = token
    return env


def svllm(router: Proc, *args: str, token: str | None = None, timeout: float = 60) -> Result:
    p = subprocess.run([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                       env=cli_env(router, token), capture_output=True, text=True,
                       timeout=timeout, check=False)
    return Result(p.returncode, p.stdout, p.stderr)


def spawn_svllm(router: Proc, *args: str, token: str | None = None) -> subprocess.Popen[str]:
    """A long-running command (``logs -f``); the caller terminates it."""
    return subprocess.Popen([sys.executable, "-m", "services.cli", *args], cwd=ROOT,
                            env=cli_env(router, token), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
