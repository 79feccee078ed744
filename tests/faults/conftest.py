"""The faults tier: each test causes a real failure and records one row of the recovery table.

Every fault test asks for the `fault_row` fixture and calls it once with what it observed:

    fault_row("kill -9 a Ray Train worker", "completed in the same attempt", steps_redone=2,
              records_twice=0, recover_s=14.2)

The row travels with the test's report (its user_properties), so that the whole table is printed at the end of
the session by tests/conftest.py, from whichever worker ran the test (`fault | outcome | steps redone | records
trained twice | time to recover`): a CI log shows at a glance what each fault cost. A test that fails before it
calls fault_row records nothing: the table holds only observed outcomes, never expected ones.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest


def _cell(value: Any) -> str:
    if value is None:
        return "-"
    if isinstance(value, float):
        return f"{value:.1f} s"
    return str(value)


@pytest.fixture
def fault_row(request: pytest.FixtureRequest) -> Callable[..., None]:
    """Record one row of the recovery table (call once per observed fault)."""

    def record(
        fault: str,
        outcome: str,
        *,
        steps_redone: int | str | None = None,
        records_twice: int | str | None = None,
        recover_s: float | str | None = None,
    ) -> None:
        row = (fault, outcome, _cell(steps_redone), _cell(records_twice), _cell(recover_s))
        request.node.user_properties.append(("fault_row", row))

    return record
