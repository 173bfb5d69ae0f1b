"""Fixtures: one real redis-server per session, and per-test clusters of real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any, cast

import pytest
from httpx import _config as httpx_config
from httpx._transports import default as httpx_transports

from tests.chaos.harness import ROW, table
from tests.redis_cluster import RedisCluster
from tests.support import ROOT, Cluster, RedisServer, free_port

# Every httpx.get/post (and openai client) in the tests builds a client, and each client
# loaded the CA bundle: about 20 ms of CPU, for plain-http calls to loopback. Polling loops
# and the 1,000-client chaos test spent a large share of the suite's CPU on it. The default
# context is built once and shared (other verify/cert arguments still get their own).
_DEFAULT_SSL = httpx_config.create_ssl_context()


def _ssl_context(verify: Any = True, cert: Any = None, trust_env: bool = True) -> Any:
    if verify is True and cert is None and trust_env:
        return _DEFAULT_SSL
    return httpx_config.create_ssl_context(verify, cert, trust_env)


@pytest.fixture(scope="session", autouse=True)
def _one_ssl_context() -> Iterator[None]:
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(httpx_transports, "create_ssl_context", _ssl_context)
        yield


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    server = RedisServer(free_port(), tmp_path_factory.mktemp("redis")).start()
    yield server
    server.stop()


@pytest.fixture(scope="session")
def redis_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisCluster]:
    """A 3-primary Redis Cluster on loopback (tests marked ``redis_cluster``)."""
    servers = RedisCluster(tmp_path_factory.mktemp("redis-cluster")).start()
    yield servers
    servers.stop()


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]):
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


# Timings tests record (the opt-in real-engine tests), printed in pytest's terminal summary:
# captured output is shown only on failure, and these numbers are wanted on success too.
TIMINGS = pytest.StashKey[dict[str, float]]()


@pytest.fixture(scope="session")
def timings(request: pytest.FixtureRequest) -> dict[str, float]:
    return request.config.stash.setdefault(TIMINGS, {})


# Other figures the opt-in tests measure (hit rates, ...), printed after the timings.
FIGURES = pytest.StashKey[dict[str, str]]()


@pytest.fixture(scope="session")
def figures(request: pytest.FixtureRequest) -> dict[str, str]:
    return request.config.stash.setdefault(FIGURES, {})


# The fault-injection table's rows (tests/chaos), collected from the reports: with
# pytest-xdist the tests run in worker processes and only their reports reach this one.
CHAOS_ROWS: list[dict[str, Any]] = []


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    if report.when == "teardown":
        CHAOS_ROWS.extend(cast(dict[str, Any], value) for name, value in report.user_properties
                          if name == ROW)


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    recorded = terminalreporter.config.stash.get(TIMINGS, {})
    if recorded:
        terminalreporter.section("recorded timings")
        for name, seconds in recorded.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")
    measured = terminalreporter.config.stash.get(FIGURES, {})
    if measured:
        terminalreporter.section("recorded figures")
        for name, text in measured.items():
            terminalreporter.write_line(f"{name}: {text}")
    if CHAOS_ROWS and not hasattr(terminalreporter.config, "workerinput"):  # xdist's workers
        text = table(CHAOS_ROWS)
        terminalreporter.write_sep("=", "fault injection results")
        terminalreporter.write_line(text)
        out = ROOT / ".run" / "chaos-report.md"
        out.parent.mkdir(exist_ok=True)
        out.write_text(text + "\n")


@pytest.fixture
def cluster(
    request: pytest.FixtureRequest, redis_server: RedisServer, tmp_path: Path
) -> Iterator[Cluster]:
    # A fresh key prefix per test isolates tests that share the session's redis-server.
    c = Cluster(redis_server.url, f"t{uuid.uuid4().hex[:10]}", tmp_path)
    yield c
    c.stop_all()
    rep = getattr(request.node, "rep_call", None)
    if rep is not None and rep.failed:
        print(c.logs())
