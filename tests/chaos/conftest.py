"""Print the fault-injection results table at the end of the run (and keep a copy)."""

from __future__ import annotations

import pytest

from tests.chaos.harness import REPORT, table
from tests.support import ROOT


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not REPORT:
        return
    text = table()
    terminalreporter.write_sep("=", "fault injection results")
    terminalreporter.write_line(text)
    out = ROOT / ".run" / "chaos-report.md"
    out.parent.mkdir(exist_ok=True)
    out.write_text(text + "\n")
