"""Docker hygiene, checked statically (Docker need not be installed): the image runs as a
non-root user, has a HEALTHCHECK and installs from the lock with hashes; the build context
that .dockerignore leaves (computed here with Docker's matching rules) holds what the
Dockerfile copies and none of .venv, .run, .git, caches or secrets; compose.yaml checks every
service's health and starts each only once what it needs is healthy."""

from __future__ import annotations

import os
import re
import shlex
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from services import healthcheck
from tests.unit.deploy_support import (
    DEPLOY,
    ROOT,
    TOKENS,
    all_env_names,
    default_port,
    env_names,
    service_of,
    unknown,
)

DOCKERFILE = DEPLOY / "Dockerfile"


# --- .dockerignore, as Docker reads it (moby/patternmatcher) ---------------------------------

def ignore_patterns(text: str) -> list[tuple[re.Pattern[str], bool]]:
    """(regex, is_exception) per pattern line; comments and blank lines skipped."""
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        exception = line.startswith("!")
        pattern = os.path.normpath(line.removeprefix("!").strip().lstrip("/"))
        out.append((re.compile(_regex(pattern)), exception))
    return out


def _regex(pattern: str) -> str:
    out, i = "^", 0
    while i < len(pattern):
        ch = pattern[i]
        if pattern.startswith("**/", i):
            out, i = out + "(?:.*/)?", i + 3
        elif pattern.startswith("**", i):
            out, i = out + ".*", i + 2
        elif ch == "*":
            out, i = out + "[^/]*", i + 1
        elif ch == "?":
            out, i = out + "[^/]", i + 1
        else:
            out, i = out + re.escape(ch), i + 1
    return out + "$"


def excluded(path: str, patterns: list[tuple[re.Pattern[str], bool]]) -> bool:
    """Docker: the last pattern that matches the path or one of its parents decides."""
    parts = path.split("/")
    candidates = ["/".join(parts[:n]) for n in range(1, len(parts) + 1)]
    result = False
    for rx, exception in patterns:
        if any(rx.match(c) for c in candidates):
            result = not exception
    return result


def dockerignore() -> list[tuple[re.Pattern[str], bool]]:
    return ignore_patterns((ROOT / ".dockerignore").read_text())


def context_files() -> Iterator[str]:
    """Every file of this checkout that `docker build .` would send."""
    patterns = dockerignore()
    for top, dirs, files in os.walk(ROOT):
        rel_top = os.path.relpath(top, ROOT)
        rel = "" if rel_top == "." else rel_top + "/"
        # A directory excluded with no exception under it is not descended into.
        dirs[:] = [d for d in dirs if not excluded(rel + d, patterns)]
        for f in files:
            if not excluded(rel + f, patterns):
                yield rel + f


# --- the Dockerfile ---------------------------------------------------------------------------

def instructions() -> list[tuple[str, str]]:
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    out = []
    for raw in text.splitlines():
        line = raw.strip()
        if line and not line.startswith("#"):
            op, _, rest = line.partition(" ")
            out.append((op.upper(), rest.strip()))
    return out


def args_of(op: str) -> list[str]:
    return [rest for o, rest in instructions() if o == op]


def test_the_matcher_follows_dockers_rules() -> None:
    pats = ignore_patterns(".venv\n**/__pycache__\n*.log\n!keep.log\n/build\n")
    assert excluded(".venv/bin/python", pats)
    assert excluded("services/__pycache__/x.pyc", pats)
    assert excluded("__pycache__/x.pyc", pats)
    assert excluded("app.log", pats) and not excluded("keep.log", pats)
    assert not excluded("logs/app.log", pats)  # "*" stays in one directory
    assert excluded("build/x", pats) and not excluded("src/build/x", pats)
    assert not excluded("services/router/main.py", pats)


@pytest.mark.parametrize("path", [
    ".venv/bin/python", ".venv-lock/bin/pip-compile", ".venv-llamacpp/lib/x.so",
    ".run/redis/appendonly.aof", ".run/tokens.env", ".run/logs/router.log", ".git",
    ".git/HEAD", "services/__pycache__/main.cpython-311.pyc", ".mypy_cache/3.11/x.json",
    ".pytest_cache/v/cache", ".ruff_cache/x", "serverless_vllm.egg-info/PKG-INFO", ".env",
    "deploy/kubernetes/base/tokens.env", "deploy/kubernetes/overlays/external-redis/redis.env",
    "deploy/systemd/svllm.env", "bench/results/run.json",
])
def test_dockerignore_keeps_out(path: str) -> None:
    assert excluded(path, dockerignore())


def test_context_holds_what_the_dockerfile_copies() -> None:
    context = set(context_files())
    tracked = subprocess.run(["git", "ls-files"], cwd=ROOT, capture_output=True, text=True,
                             check=True).stdout.split()
    for copy in args_of("COPY"):
        *sources, _ = shlex.split(copy)
        for source in sources:
            src = source.rstrip("/")
            wanted = {f for f in tracked if f == src or f.startswith(src + "/")}
            assert wanted, f"COPY {src}: nothing tracked there"
            assert wanted <= context, f"COPY {src}: {sorted(wanted - context)[:5]} left out"


def test_context_of_this_checkout_is_clean() -> None:
    context = list(context_files())
    bad = [f for f in context if re.search(
        r"(^|/)(\.venv[^/]*|\.run|\.git|__pycache__|\.[a-z]+_cache)(/|$)|\.pyc$|(^|/)\.?env$|"
        r"\.env$", f)]
    assert not bad, bad[:10]
    size = sum((ROOT / f).stat().st_size for f in context)
    assert size < 50 * 2**20, f"context is {size / 2**20:.0f} MB"


def test_image_runs_as_non_root_with_a_healthcheck() -> None:
    users = args_of("USER")
    assert users, "no USER: the services would run as root"
    assert users[-1].split(":")[0] not in ("root", "0")
    (hc,) = args_of("HEALTHCHECK")
    assert "services.healthcheck" in hc
    assert instructions()[-1][0] == "CMD"


def test_image_installs_from_the_lock_with_hashes() -> None:
    runs = " ".join(args_of("RUN"))
    assert "--require-hashes -r requirements.lock" in runs
    assert "requirements.txt" not in runs
    copies = [shlex.split(c)[0] for c in args_of("COPY")]
    assert copies[0] == "requirements.lock"


def test_image_env_is_settings() -> None:
    names = set()
    for env in args_of("ENV"):
        names |= {item.split("=", 1)[0] for item in shlex.split(env)}
    assert names
    assert not unknown(names, all_env_names())


# --- compose.yaml -----------------------------------------------------------------------------

def compose() -> dict[str, Any]:
    data = yaml.safe_load((ROOT / "compose.yaml").read_text())
    assert isinstance(data, dict)
    return data


_MONITORING_HEALTH = {"prometheus": "http://127.0.0.1:9090/-/healthy",
                      "grafana": "http://127.0.0.1:3000/api/health"}


def test_every_service_checks_its_health() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        if name == "nginx":  # the entry point: nothing depends on it
            continue
        test = svc["healthcheck"]["test"]
        assert test[0] == "CMD", name
        ours = service_of(svc.get("command", []))
        if ours:
            assert test[1:] == ["python3", "-m", "services.healthcheck", ours], name
        elif name in _MONITORING_HEALTH:  # the monitoring profile's images: their own /health
            assert test[1:] == ["wget", "-q", "-O", "/dev/null", _MONITORING_HEALTH[name]], name
        else:
            assert test[1:] == ["redis-cli", "ping"], name


def test_services_start_once_what_they_need_is_healthy() -> None:
    services = compose()["services"]
    for name, svc in services.items():
        # Redis needs nothing; Prometheus scrapes whatever is up and retries the rest.
        deps = svc.get("depends_on", {} if name in ("redis", "prometheus") else None)
        assert isinstance(deps, dict), f"{name}: depends_on without conditions"
        for dep, cond in deps.items():
            assert cond == {"condition": "service_healthy"}, (name, dep)
            assert "healthcheck" in services[dep], (name, dep)


def test_compose_worker_gets_the_gpus_and_host_ipc() -> None:
    worker = compose()["services"]["worker-1"]
    assert worker["ipc"] == "host"
    (device,) = worker["deploy"]["resources"]["reservations"]["devices"]
    assert device["driver"] == "nvidia" and "gpu" in device["capabilities"]
    assert service_of(worker["command"]) == "worker"


def test_compose_env_is_settings_and_tokens_come_from_env() -> None:
    seen = set()
    for name, svc in compose()["services"].items():
        ours = service_of(svc.get("command", []))
        if not ours:
            continue
        seen.add(ours)
        env = svc["environment"]
        assert not unknown(set(env), env_names(ours)), name
        for key, value in env.items():
            if key in TOKENS:
                assert value.startswith(f"${{{key}:?"), f"{name}: {key} is not from .env"
    assert seen == {"router", "manager", "worker"}


# --- services/healthcheck.py ------------------------------------------------------------------

def test_healthcheck_ports_are_the_settings_defaults() -> None:
    for service, port in healthcheck.DEFAULT_PORTS.items():
        assert port == default_port(service)
        assert f"{service.upper()}_PORT" in env_names(service)
        assert f"{service.upper()}_HOST" in env_names(service)


def test_healthcheck_url() -> None:
    assert healthcheck.health_url("worker", {}) == "http://127.0.0.1:7000/health"
    env = {"MANAGER_PORT": "9100", "MANAGER_HOST": "0.0.0.0"}
    assert healthcheck.health_url("manager", env) == "http://127.0.0.1:9100/health"
    env = {"ROUTER_HOST": "10.0.0.5"}
    assert healthcheck.health_url("router", env) == "http://10.0.0.5:8000/health"
    assert healthcheck.health_url("router", {"ROUTER_HOST": "::1"}) == "http://[::1]:8000/health"


def test_healthcheck_finds_the_containers_service(tmp_path: Path) -> None:
    cmdline = tmp_path / "cmdline"
    cmdline.write_bytes(b"python3\0-m\0services.worker.main\0")
    assert healthcheck.main_service(cmdline) == "worker"
    cmdline.write_bytes(b"/bin/sh\0")
    assert healthcheck.main_service(cmdline) == "router"
    assert healthcheck.main_service(tmp_path / "missing") == "router"
    assert healthcheck.main(["healthcheck", "nginx"]) == 1
