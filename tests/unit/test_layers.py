"""The layers of docs/architecture.md, checked on the source text (lint-imports checks the import graph too)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
LOWER_LAYERS = {
    "kubetune": ("kubetune_operator", "kubetune_trainer", "kubetune_cli"),
    "operator/kubetune_operator": ("kubetune_trainer", "kubetune_cli"),
    "trainer/kubetune_trainer": ("kubetune_operator", "kubetune_cli"),
}


def _imports_of(package: str, forbidden: tuple[str, ...]) -> list[str]:
    pattern = rf"^\s*(from|import)\s+({'|'.join(forbidden)})\b"
    out = subprocess.run(
        ["git", "grep", "-n", "-E", pattern, "--", f"{package}/*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.returncode in (0, 1), out.stderr  # 1: no match
    return out.stdout.splitlines()


@pytest.mark.parametrize("package", sorted(LOWER_LAYERS))
def test_no_import_points_up_or_sideways(package: str) -> None:
    assert _imports_of(package, LOWER_LAYERS[package]) == []


def test_the_check_sees_an_upward_import(tmp_path: Path) -> None:
    """The pattern above matches the lines it must refuse (so the test cannot pass by matching nothing)."""
    pattern = re.compile(rf"^\s*(from|import)\s+({'|'.join(LOWER_LAYERS['kubetune'])})\b")
    assert pattern.match("from kubetune_cli.localenv import samples")
    assert pattern.match("    import kubetune_operator.kube")
    assert not pattern.match("from kubetune import api")


def test_the_core_has_no_dev_package() -> None:
    assert not (ROOT / "kubetune" / "cli").exists() and not (ROOT / "kubetune" / "localenv").exists()
    assert not (ROOT / "operator" / "__init__.py").exists()  # `operator` would shadow the standard library module


def test_one_bearer_token_workaround() -> None:
    """kubernetes==36 drops kubeconfig bearer tokens; the fix lives once, in kubetune/kubeclient.py."""
    out = subprocess.run(
        ["git", "grep", "-l", "-E", r"auth\[\"BearerToken\"\] =", "--", "*.py"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert out.stdout.split() == ["kubetune/kubeclient.py"]


def test_localenv_exports_resolve() -> None:
    """The lazy names of kubetune_cli.localenv point at modules that exist (they broke silently in a rename)."""
    import kubetune_cli.localenv as localenv

    for name in localenv.__all__:
        assert getattr(localenv, name) is not None, name
