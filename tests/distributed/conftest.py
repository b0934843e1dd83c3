"""The distributed tests' order (as written, in any run order), and their figures, printed
as one table at the end of the run."""

from __future__ import annotations

from pathlib import Path

import pytest

#: ``(scenario, outcome, figures)`` rows, appended by the tests.
FIGURES: list[tuple[str, str, str]] = []


@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """This module's tests in the order they are written, wherever a random order put the module.

    They share one stack and build on each other: the token test reads every table and log the
    scenarios before it left. ``-p randomly`` shuffles before this hook runs.
    """
    here = Path(__file__).parent
    ours = [i for i, item in enumerate(items) if here in item.path.parents]
    ordered = sorted((items[i] for i in ours), key=lambda item: (str(item.path), item.reportinfo()[1] or 0))
    for index, item in zip(ours, ordered, strict=True):
        items[index] = item


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    if not FIGURES:
        return
    terminalreporter.section("distributed stack (CeleryExecutor, PostgreSQL, Redis, 2 workers, 2 triggerers)")
    terminalreporter.write_line("| scenario | outcome | figures |")
    terminalreporter.write_line("|---|---|---|")
    for scenario, outcome, figures in FIGURES:
        terminalreporter.write_line(f"| {scenario} | {outcome} | {figures} |")
