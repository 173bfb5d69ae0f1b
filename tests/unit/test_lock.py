"""The lock files pin everything the requirements name, agree with each other, and the fast
lane runs on the pinned uvicorn (its internals are all there)."""

from __future__ import annotations

import re
from importlib import metadata
from pathlib import Path

import pytest
from uvicorn.protocols.http.httptools_impl import HttpToolsProtocol, RequestResponseCycle

from shared import edge, fastlane

ROOT = Path(__file__).resolve().parents[2]
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s\\;]+)")


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def pins(lock: str) -> dict[str, str]:
    text = (ROOT / lock).read_text()
    out: dict[str, str] = {}
    for block in re.split(r"\n(?=[A-Za-z0-9])", text):
        m = _PIN.match(block)
        if m:
            assert "--hash=sha256:" in block, f"{m.group(1)} in {lock} has no hash"
            out[_norm(m.group(1))] = m.group(2)
    return out


def required(req: str) -> set[str]:
    names: set[str] = set()
    for raw in (ROOT / req).read_text().splitlines():
        line = raw.split("#", 1)[0].strip()
        if line and not line.startswith("-"):
            names.add(_norm(re.split(r"[<>=!~\[; ]", line, maxsplit=1)[0]))
    return names


@pytest.mark.parametrize(("req", "lock"), [("requirements.txt", "requirements.lock"),
                                           ("requirements-dev.txt", "requirements-dev.lock")])
def test_every_requirement_is_pinned(req: str, lock: str) -> None:
    missing = required(req) - set(pins(lock))
    assert not missing, f"{lock} lacks {missing}: run scripts/lock.sh"


def test_locks_agree() -> None:
    runtime, dev = pins("requirements.lock"), pins("requirements-dev.lock")
    assert runtime.keys() <= dev.keys()
    differ = {n: (v, dev[n]) for n, v in runtime.items() if dev[n] != v}
    assert not differ, f"runtime and dev locks disagree: {differ}"


def test_installed_uvicorn_is_the_locked_one() -> None:
    assert metadata.version("uvicorn") == pins("requirements.lock")["uvicorn"]


def test_fast_lane_and_edge_limits_run_on_the_locked_uvicorn() -> None:
    assert fastlane.missing_internals() == []
    assert fastlane.supported()
    assert edge.missing_internals() == []


def test_a_missing_internal_turns_the_lane_off() -> None:
    # A uvicorn release that renamed one method or attribute the lane uses.
    class Renamed(HttpToolsProtocol):
        pause_writing = None  # type: ignore[assignment]

    class Cycle:  # keeps run_asgi, lacks every attribute
        async def run_asgi(self, app: object) -> None:
            return None

    missing = fastlane.missing_internals(Renamed, Cycle)
    assert "Renamed.pause_writing" in missing
    assert "Cycle.message_event" in missing
    assert fastlane.missing_internals(HttpToolsProtocol, RequestResponseCycle) == []
    assert "Renamed.pause_writing" not in edge.missing_internals(Renamed)

    class NoParser(HttpToolsProtocol):
        on_header = None  # type: ignore[assignment]

    assert edge.missing_internals(NoParser) == ["NoParser.on_header"]
