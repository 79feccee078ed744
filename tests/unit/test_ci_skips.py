"""tests/conftest.py's CI rule (a skipped real-component test fails under CI) and its tier timing line."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
pytest_plugins = ["pytester"]

CONFTEST = Path(__file__).resolve().parents[1] / "conftest.py"
TESTS = """
import pytest

@pytest.mark.integration
def test_needs_a_server():
    pytest.skip("no API server here")

@pytest.mark.unit
def test_pure_but_skipped():
    pytest.skip("nothing to do on this platform")

@pytest.mark.unit
def test_pure():
    assert 1 + 1 == 2
"""


@pytest.mark.parametrize(("ci", "failed", "skipped"), [("1", 1, 1), ("true", 1, 1), ("", 0, 2), ("0", 0, 2)])
def test_a_real_component_skip_fails_only_in_ci(
    pytester: pytest.Pytester, monkeypatch: pytest.MonkeyPatch, ci: str, failed: int, skipped: int
) -> None:
    monkeypatch.setenv("CI", ci)
    pytester.makeconftest(CONFTEST.read_text())
    pytester.makepyfile(test_sample=TESTS)
    result = pytester.runpytest_inprocess("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=failed, skipped=skipped)
    if failed:
        result.stdout.fnmatch_lines(["*CI: a real-component test may not skip (*no API server here*"])
    result.stdout.fnmatch_lines(["tier timings: unit * s (2 tests) | integration * s (1 tests) | total * s"])
