"""scripts/start_all.py's tokens: generated once, kept, and the file always holds the tokens
in use (it is what the README tells users to source)."""

from __future__ import annotations

import shlex
import stat
import subprocess
from pathlib import Path

import pytest

from scripts.start_all import TOKENS, load_tokens


def read(path: Path) -> dict[str, str]:
    """What a shell that sources the file gets."""
    out = subprocess.run(["bash", "-c", f"set -a; . {shlex.quote(str(path))}; env"],
                         capture_output=True, text=True, check=True, env={"PATH": "/usr/bin:/bin"})
    got = dict(line.split("=", 1) for line in out.stdout.splitlines() if "=" in line)
    return {n: got[n] for n in TOKENS if n in got}


@pytest.fixture(autouse=True)
def no_env_tokens(monkeypatch: pytest.MonkeyPatch) -> None:
    for name in TOKENS:
        monkeypatch.delenv(name, raising=False)


def test_generated_on_the_first_run_and_kept(tmp_path: Path) -> None:
    path = tmp_path / "run" / "tokens.env"
    first = load_tokens(path)
    assert set(first) == set(TOKENS) and len(set(first.values())) == 3
    assert read(path) == first
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert load_tokens(path) == first


def test_a_token_from_the_environment_wins_and_is_what_the_file_holds(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.env"
    first = load_tokens(path)
    monkeypatch.setenv("API_TOKEN", "from-the-environment")
    in_use = load_tokens(path)
    assert in_use["API_TOKEN"] == "from-the-environment"
    assert in_use["ADMIN_TOKEN"] == first["ADMIN_TOKEN"]
    # Sourcing the file gives the tokens the services were started with.
    assert read(path) == in_use
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_first_run_with_a_token_in_the_environment_writes_that_token(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.env"
    monkeypatch.setenv("ADMIN_TOKEN", "admin-from-env")
    in_use = load_tokens(path)
    assert read(path) == in_use and in_use["ADMIN_TOKEN"] == "admin-from-env"


def test_a_file_that_agrees_is_not_rewritten(tmp_path: Path) -> None:
    path = tmp_path / "tokens.env"
    load_tokens(path)
    before = path.stat().st_mtime_ns
    path.chmod(0o644)
    load_tokens(path)
    assert path.stat().st_mtime_ns == before
    assert stat.S_IMODE(path.stat().st_mode) == 0o600


def test_a_token_a_shell_would_run_is_written_quoted(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = tmp_path / "tokens.env"
    hostile = "a b$(touch PWNED);`id`'\"x"
    monkeypatch.setenv("API_TOKEN", hostile)
    in_use = load_tokens(path)
    assert in_use["API_TOKEN"] == hostile
    assert read(path)["API_TOKEN"] == hostile  # sourced: the value, nothing run
    assert not (tmp_path / "PWNED").exists() and not Path("PWNED").exists()
    monkeypatch.delenv("API_TOKEN")
    assert load_tokens(path)["API_TOKEN"] == hostile  # and read back as it was


def test_an_existing_file_open_to_others_is_made_private_before_it_is_written(
        tmp_path: Path) -> None:
    path = tmp_path / "tokens.env"
    path.write_text("")
    path.chmod(0o644)
    load_tokens(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
