"""The faults tier: each test causes a real failure and records one row of the recovery table.

Every fault test asks for the `fault_row` fixture and calls it once with what it observed:

    fault_row("kill -9 a Ray Train worker", "completed in the same attempt", steps_redone=2,
              records_twice=0, recover_s=14.2)

The whole table is printed at the end of the session (`fault | outcome | steps redone | records trained
twice | time to recover`), so a CI log shows at a glance what each fault cost. A test that fails records
nothing: the table holds only observed outcomes, never expected ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest

COLUMNS = ("fault", "outcome", "steps redone", "records trained twice", "time to recover")
_ROWS: list[tuple[str, ...]] = []


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f} s"
    return str(value)


@pytest.fixture
def fault_row() -> Callable[..., None]:
    """Record one row of the recovery table (call once per observed fault)."""

    def record(
        fault: str,
        outcome: str,
        *,
        steps_redone: int | str | None = None,
        records_twice: int | str | None = None,
        recover_s: float | str | None = None,
    ) -> None:
        _ROWS.append((fault, outcome, _cell(steps_redone), _cell(records_twice), _cell(recover_s)))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _ROWS:
        return
    widths = [max(len(c), *(len(r[i]) for r in _ROWS)) for i, c in enumerate(COLUMNS)]
    line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731 - local formatter
    terminalreporter.section("faults: what was recovered and what was lost")
    terminalreporter.write_line(line(COLUMNS))
    terminalreporter.write_line("-+-".join("-" * w for w in widths))
    for row in _ROWS:
        terminalreporter.write_line(line(row))
