"""Figures of the distributed tests, printed as one table at the end of the run."""

from __future__ import annotations

from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import pytest

#: ``(scenario, outcome, figures)`` rows, appended by the tests.
FIGURES: list[tuple[str, str, str]] = []


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("distributed stack (CeleryExecutor, PostgreSQL, Redis, 2 workers, 2 triggerers)")
    terminalreporter.write_line("| scenario | outcome | figures |")
    terminalreporter.write_line("|---|---|---|")
    for scenario, outcome, figures in FIGURES:
        terminalreporter.write_line(f"| {scenario} | {outcome} | {figures} |")
