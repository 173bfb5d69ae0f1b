"""Fixtures for the real llama.cpp tests: the llama.cpp venv's python and a generated tiny
GGUF; without the venv the tests are skipped."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import ROOT

# Writing the GGUF takes a second; the self-check loads it with llama_cpp. Bounded anyway.
MAKE_GGUF_TIMEOUT_S = 300
ENV_VAR = "SVLLM_LLAMACPP_PYTHON"


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    # The default suite runs without the llama.cpp venv: skip rather than fail there.
    if os.environ.get(ENV_VAR):
        return
    skip = pytest.mark.skip(reason=f"{ENV_VAR} is unset: run scripts/llamacpp_test.sh, which "
                            "installs llama-cpp-python into its own venv and sets it")
    for item in items:
        if item.get_closest_marker("real_llamacpp"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def llamacpp_python() -> str:
    """The interpreter of the venv llama-cpp-python is installed in (not the project's)."""
    value = os.environ.get(ENV_VAR, "")
    if not value:
        pytest.skip(f"{ENV_VAR} is unset: run scripts/llamacpp_test.sh")
    if not os.access(value, os.X_OK):
        pytest.fail(f"{ENV_VAR}={value} is not an executable")
    return value


@pytest.fixture(scope="session")
def tiny_gguf(
    llamacpp_python: str, tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]
) -> Path:
    """A tiny random-weight llama GGUF, written offline (no model hub on test machines)."""
    out = tmp_path_factory.mktemp("tiny-gguf") / "tiny.gguf"
    started = time.monotonic()
    done = subprocess.run(
        [llamacpp_python, str(ROOT / "scripts" / "make_tiny_gguf.py"), str(out)],
        capture_output=True, text=True, timeout=MAKE_GGUF_TIMEOUT_S, check=False,
    )
    timings["make tiny GGUF (+ llama_cpp self-check)"] = time.monotonic() - started
    assert done.returncode == 0, f"make_tiny_gguf.py failed:\n{done.stdout}\n{done.stderr}"
    return out.resolve()
