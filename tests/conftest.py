"""Fixtures: one real redis-server per session, and per-test clusters of real processes."""

from __future__ import annotations

import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.redis_cluster import RedisCluster
from tests.support import Cluster, RedisServer, free_port


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


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    recorded = terminalreporter.config.stash.get(TIMINGS, {})
    if recorded:
        terminalreporter.section("recorded timings")
        for name, seconds in recorded.items():
            terminalreporter.write_line(f"{name}: {seconds:.1f} s")


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
