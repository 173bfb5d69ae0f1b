"""What the deployment tests share: the settings each service reads, the variables that are
not settings (and why they are set), and small readers for the deployment files."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import yaml
from pydantic_settings import BaseSettings

from shared.settings import ManagerSettings, RouterSettings, WorkerSettings

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "kubernetes"
SYSTEMD = DEPLOY / "systemd"

SETTINGS: dict[str, type[BaseSettings]] = {
    "router": RouterSettings, "manager": ManagerSettings, "worker": WorkerSettings}
TOKENS = frozenset({"ADMIN_TOKEN", "INTERNAL_TOKEN", "API_TOKEN"})
_SERVICE = re.compile(r"services\.(router|manager|worker)\.main")

# Variables set in the deployment files that are not settings of ours, each with its reason.
# "engine": the worker passes it on to engines (services/worker/engines/environment.py).
EXTERNAL: dict[str, str] = {
    "HF_HOME": "engine: the Hugging Face cache where engines keep downloaded weights",
    "HF_TOKEN": "engine: gated models on the Hugging Face Hub",
    "POD_IP": "Kubernetes: the pod's IP, substituted into WORKER_URL as $(POD_IP)",
    "PATH": "image: the services' virtual environment first",
    "PYTHONUNBUFFERED": "image: log lines leave the process at once",
    "PYTHONDONTWRITEBYTECODE": "image: no .pyc files written under a read-only root",
}


def env_names(service: str) -> set[str]:
    """The environment variables ``service``'s settings read (pydantic-settings: upper case)."""
    return {name.upper() for name in SETTINGS[service].model_fields}


def all_env_names() -> set[str]:
    return set().union(*(env_names(s) for s in SETTINGS))


def default_port(service: str) -> int:
    default = SETTINGS[service].model_fields[f"{service}_port"].default
    assert isinstance(default, int)
    return default


def service_of(command: list[str] | str) -> str | None:
    """router, manager or worker for a command running ``services.<name>.main``."""
    text = command if isinstance(command, str) else " ".join(command)
    m = _SERVICE.search(text)
    return m.group(1) if m else None


def unknown(names: set[str], allowed: set[str]) -> set[str]:
    return {n for n in names if n not in allowed and n not in EXTERNAL}


def load_yaml_docs(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.safe_load_all(path.read_text()) if d]


def env_file_keys(path: Path) -> dict[str, str]:
    """KEY=VALUE lines of an env file (systemd EnvironmentFile, kustomize envs), comments out."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            key, sep, value = line.partition("=")
            assert sep, f"{path.name}: '{line}' is not KEY=VALUE"
            out[key.strip()] = value.strip()
    return out


def commented_env_keys(path: Path) -> dict[str, str]:
    """Also the commented-out KEY=VALUE lines: the alternatives an example file offers."""
    out: dict[str, str] = {}
    for raw in path.read_text().splitlines():
        m = re.match(r"^#?\s*([A-Z][A-Z0-9_]*)=(\S*)$", raw.strip())
        if m:
            out[m.group(1)] = m.group(2)
    return out
