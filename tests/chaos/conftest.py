"""Hand each test's rows of the fault-injection table to the run's summary (tests/conftest.py
prints it): through the test's report, which pytest-xdist carries back from its workers."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.chaos.harness import REPORT, ROW


@pytest.fixture(autouse=True)
def _report_rows(request: pytest.FixtureRequest) -> Iterator[None]:
    first = len(REPORT)
    yield
    # Teardown: the rows land in the teardown report, the one tests/conftest.py reads.
    request.node.user_properties.extend((ROW, row) for row in REPORT[first:])
