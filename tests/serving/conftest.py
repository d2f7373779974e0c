"""Serving tests skip when their venv is not built: say so in the summary, one line each, even under ``-q``."""

from __future__ import annotations

from typing import Any


def pytest_terminal_summary(terminalreporter: Any) -> None:
    reasons = sorted(
        {
            str(report.longrepr[-1]).removeprefix("Skipped: ")
            for report in terminalreporter.stats.get("skipped", [])
            if "tests/serving/" in report.nodeid and isinstance(report.longrepr, tuple)
        }
    )
    for reason in reasons:
        terminalreporter.write_line(f"serving tests skipped: {reason}")
