"""deploy/systemd: one unit per service, each parsed and checked for what the docs promise
(restart policy, a dedicated user, hardening, the worker's GPUs and state dir, tokens only in
the root-only environment file), and verified by `systemd-analyze verify` where it exists."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path, PurePosixPath

import pytest

from tests.unit.deploy_support import (
    SYSTEMD,
    TOKENS,
    all_env_names,
    env_file_keys,
    env_names,
    service_of,
    unknown,
)

SERVICES = ("router", "manager", "worker")
Unit = dict[str, list[tuple[str, str]]]
ENV_FILE = "/etc/svllm/svllm.env"


def parse_unit(text: str) -> Unit:
    """A systemd unit file: sections of (key, value) in order (keys may repeat)."""
    unit: Unit = {}
    section: list[tuple[str, str]] | None = None
    for n, raw in enumerate(text.replace("\\\n", " ").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith(("#", ";")):
            continue
        if line.startswith("[") and line.endswith("]"):
            section = unit.setdefault(line[1:-1], [])
            continue
        key, sep, value = line.partition("=")
        assert sep and section is not None, f"line {n}: '{line}' is not Key=Value in a section"
        section.append((key.strip(), value.strip()))
    return unit


def values(unit: Unit, key: str, section: str = "Service") -> list[str]:
    return [v for k, v in unit.get(section, []) if k == key]


def one(unit: Unit, key: str, section: str = "Service") -> str:
    found = values(unit, key, section)
    assert len(found) == 1, f"{key}: {found}"
    return found[0]


def environment(unit: Unit) -> dict[str, str]:
    out: dict[str, str] = {}
    for v in values(unit, "Environment"):
        for item in v.split():
            name, _, value = item.strip('"').partition("=")
            out[name] = value
    return out


def load(service: str) -> Unit:
    return parse_unit((SYSTEMD / f"svllm-{service}.service").read_text())


def test_one_unit_per_service_and_nothing_else() -> None:
    assert {p.name for p in SYSTEMD.glob("*.service")} == {
        f"svllm-{s}.service" for s in SERVICES}


def test_the_parser_sees_sections_and_repeated_keys() -> None:
    unit = parse_unit("[Service]\n# c\nEnvironment=A=1\nEnvironment=B=2 C=3\n[Install]\nX=y\n")
    assert environment(unit) == {"A": "1", "B": "2", "C": "3"}
    assert one(unit, "X", "Install") == "y"
    with pytest.raises(AssertionError):
        parse_unit("[Service]\nnot a directive\n")


@pytest.mark.parametrize("service", SERVICES)
def test_unit_runs_its_service_restarts_and_drops_privileges(service: str) -> None:
    unit = load(service)
    assert service_of(one(unit, "ExecStart")) == service
    assert one(unit, "Restart") == "on-failure"
    assert one(unit, "User") not in ("root", "0")
    assert one(unit, "Group") not in ("root", "0")
    # No "-" prefix: a missing environment file (no tokens) stops the start, loudly.
    assert one(unit, "EnvironmentFile") == ENV_FILE
    assert one(unit, "WantedBy", "Install") == "multi-user.target"
    for key in ("NoNewPrivileges", "ProtectHome", "PrivateTmp", "ProtectKernelModules",
                "ProtectControlGroups", "RestrictSUIDSGID"):
        assert one(unit, key) == "yes", key
    assert one(unit, "ProtectSystem") == "strict"
    assert one(unit, "CapabilityBoundingSet") == ""


@pytest.mark.parametrize("service", ["router", "manager"])
def test_control_plane_units_have_no_devices(service: str) -> None:
    unit = load(service)
    assert one(unit, "PrivateDevices") == "yes"
    assert one(unit, "ProtectClock") == "yes"


def test_worker_keeps_the_gpus_and_writes_only_its_dirs() -> None:
    unit = load("worker")
    # Each of these closes the device policy, and with it /dev/nvidia*.
    for key in ("PrivateDevices", "DeviceAllow", "ProtectClock", "DevicePolicy"):
        assert values(unit, key) == [], key
    assert one(unit, "KillMode") == "mixed"  # the worker stops its engines itself
    writable = [PurePosixPath(p) for v in values(unit, "ReadWritePaths") for p in v.split()]
    writable += [PurePosixPath("/var/lib", d) for d in values(unit, "StateDirectory")]
    writable += [PurePosixPath("/var/cache", d) for d in values(unit, "CacheDirectory")]
    env = environment(unit)
    for name in ("STATE_DIR", "HF_HOME"):
        path = PurePosixPath(env[name])
        assert any(path.is_relative_to(w) for w in writable), f"{name}={path} is read-only"


@pytest.mark.parametrize("service", SERVICES)
def test_unit_environment_is_settings_and_holds_no_token(service: str) -> None:
    env = environment(load(service))
    assert not unknown(set(env), env_names(service))
    assert not {n for n in env if n.endswith("_TOKEN")}, "tokens belong in the 0600 env file"


def test_env_file_example_is_settings_with_placeholders() -> None:
    example = SYSTEMD / "svllm.env.example"
    keys = env_file_keys(example)
    assert not unknown(set(keys), all_env_names())
    assert set(keys) >= TOKENS | {"REDIS_URL"}
    for token in TOKENS:
        assert keys[token] == "CHANGE-ME"
    text = example.read_text()
    assert "-m 0600" in text and "openssl rand" in text


@pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                    reason="systemd-analyze is not installed on this machine; units are "
                           "parse-checked above")
def test_systemd_analyze_verify(tmp_path: Path) -> None:
    # verify checks that ExecStart's program exists: this interpreter stands in for the
    # install's /opt/svllm/venv/bin/python. Warnings (an unknown or misspelt directive) fail.
    for service in SERVICES:
        text = (SYSTEMD / f"svllm-{service}.service").read_text()
        (tmp_path / f"svllm-{service}.service").write_text(
            text.replace("/opt/svllm/venv/bin/python", sys.executable))
    (tmp_path / "svllm-typo.service").write_text(
        "[Service]\nExecStart=/bin/true\nProtectSystm=strict\n")

    def verify(name: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["systemd-analyze", "verify", "--man=no", str(tmp_path / name)],
                              capture_output=True, text=True, timeout=60, check=False)

    for service in SERVICES:
        out = verify(f"svllm-{service}.service")
        assert out.returncode == 0 and not out.stderr.strip(), out.stderr
    assert "ProtectSystm" in verify("svllm-typo.service").stderr
