"""Shared pytest fixtures: a real control plane (with KubeRay's CRDs) and a real S3 server per session.

Why session scope: the control plane takes ~8 s plus ~7 s for KubeRay's CRDs on a 2-core machine, so every
test shares one and isolates itself with the function-scoped `namespace` fixture. Servers start lazily:
a run of unit tests alone never starts them. Each fixture stops what it started (also when tests fail);
`kubetune_cli.localenv` additionally kills leftovers at interpreter exit and its children die with the process.

Set KUBECONFIG and KUBETUNE_TEST_EXISTING_CLUSTER=1 to run against an existing cluster instead.
"""

from __future__ import annotations

import os
import re
import secrets
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

MARKERS = {
    "unit": "pure functions and builders, no servers; seconds",
    "integration": "real kube-apiserver + etcd (+ controller-manager) and/or real SeaweedFS",
    "training": "real Ray + DeepSpeed on CPU with tiny models",
    "e2e": "apply an example manifest, train on CPU, deploy, query the OpenAI API",
    "slow": "takes more than a few seconds even on an idle machine",
    "faults": "causes a real failure and records what was recovered and what was lost",
}


def pytest_configure(config: pytest.Config) -> None:
    for name, description in MARKERS.items():
        config.addinivalue_line("markers", f"{name}: {description}")


# --- CI: a skipped real-component test is a failure ---------------------------------------------------------
# A test that needs a real component (an API server, SeaweedFS, Ray, vLLM) and skips because it is missing
# would pass CI while proving nothing. With CI set (CI=1 / CI=true, as .ci/run sets it) such a skip fails.
REAL_COMPONENT_TIERS = ("integration", "training", "serving", "e2e", "faults", "slow")
# The tiers of the timing line, in the order they are printed; a test counts under the first it carries.
TIERS = ("unit", "integration", "training", "serving", "e2e", "faults")


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _tier(item: pytest.Item) -> str:
    marks = {m.name for m in item.iter_markers()}
    return next((t for t in reversed(TIERS) if t in marks), "unmarked")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]  # pluggy's Result, untyped here
    # The tier travels with the report to xdist's controller (a report's attributes are serialised with it; its
    # keywords would not do: they hold the folder names too, so every test under tests/serving/ says "serving").
    report.tier = _tier(item)  # type: ignore[attr-defined]  # an extra attribute, as TestReport(**extra) allows
    real = any(item.get_closest_marker(name) for name in REAL_COMPONENT_TIERS)
    if in_ci() and report.skipped and real and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI: a real-component test may not skip ({reason})"


# --- Two workers (pytest-xdist, scripts/test.sh) ---------------------------------------------------------------
# Much of the suite waits (on operator timers, server starts, outages it causes), so two workers on CI's 2 cores
# finish it well before one. Files go whole to one worker (--dist loadfile: a module's fixtures, such as the
# faults' shared runs, are made once), heaviest tiers first (--no-loadscope-reorder keeps this order), so that
# what is left at the end for one worker alone is short. Reports come back to the controller, which sums the
# tier timings and prints the recovery table: both are gathered from reports, never from a worker's memory.
_ORDER = ("faults", "e2e", "training", "serving", "integration", "unit", "unmarked")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if not hasattr(config, "workerinput"):  # only an xdist worker's order schedules anything
        return
    rank: dict[Path, int] = {}  # a file ranks by its heaviest test; its tests keep their order (a stable sort)
    for item in items:
        rank[item.path] = min(rank.get(item.path, len(_ORDER)), _ORDER.index(_tier(item)))
    items.sort(key=lambda item: rank[item.path])  # every worker sorts alike, so their collections agree


_TIER_SECONDS: dict[str, list[float]] = {}  # tier -> [seconds, tests]
_FAULT_ROWS: list[list[str]] = []  # the recovery table (tests/faults/conftest.py: fault_row)
FAULT_COLUMNS = ("fault", "outcome", "steps redone", "records trained twice", "time to recover")


def pytest_runtest_logreport(report: pytest.TestReport) -> None:
    seconds = _TIER_SECONDS.setdefault(getattr(report, "tier", "unmarked"), [0.0, 0])
    seconds[0] += report.duration
    if report.when == "call":
        seconds[1] += 1
        _FAULT_ROWS.extend(list(value) for name, value in report.user_properties if name == "fault_row")


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """The recovery table of the faults tier, then one line: seconds per tier (setup, call and teardown of its
    tests, session fixtures included; with two workers, the sum of both workers' seconds)."""
    if _FAULT_ROWS:
        widths = [max(len(c), *(len(r[i]) for r in _FAULT_ROWS)) for i, c in enumerate(FAULT_COLUMNS)]
        line = lambda cells: " | ".join(c.ljust(w) for c, w in zip(cells, widths))  # noqa: E731 - local formatter
        terminalreporter.section("faults: what was recovered and what was lost")
        terminalreporter.write_line(line(FAULT_COLUMNS))
        terminalreporter.write_line("-+-".join("-" * w for w in widths))
        for row in _FAULT_ROWS:
            terminalreporter.write_line(line(row))
    per_tier = _TIER_SECONDS
    if not per_tier:
        return
    order = [*TIERS, "unmarked"]
    parts = [f"{t} {per_tier[t][0]:.1f} s ({int(per_tier[t][1])} tests)" for t in order if t in per_tier]
    total = sum(v[0] for v in per_tier.values())
    terminalreporter.write_line(f"tier timings: {' | '.join(parts)} | total {total:.1f} s")


@pytest.fixture(scope="session")
def control_plane() -> Iterator[Any]:
    """etcd + kube-apiserver + kube-controller-manager on loopback, KubeRay CRDs installed (session)."""
    from kubetune_cli.localenv.control_plane import ControlPlane

    cp = ControlPlane.from_existing() or ControlPlane(controller_manager=True)
    with cp:
        cp.install_kuberay_crds()  # KubeRay's own CRDs (kept as cp.kuberay); missing ones are an error
        yield cp


@pytest.fixture(scope="session")
def kubeconfig(control_plane: Any) -> Path:
    """Admin (system:masters) kubeconfig of the session's control plane."""
    return Path(control_plane.kubeconfig)


@pytest.fixture(scope="session")
def k8s_client(control_plane: Any) -> Iterator[Any]:
    """A `kubernetes.client.ApiClient` as admin (with the v36 bearer-token fix applied)."""
    with control_plane.api_client() as api:
        yield api


@pytest.fixture(scope="session")
def s3_server() -> Iterator[Any]:
    """SeaweedFS with random credentials and the bucket `kubetune-test` (session)."""
    from kubetune_cli.localenv.s3_server import S3Server

    with S3Server(buckets=["kubetune-test"]) as server:
        yield server


@pytest.fixture(scope="session")
def mlflow_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """A real MLflow tracking server on 127.0.0.1, SQLite store (session; its venv: tools/mlflow-venv.sh)."""
    from tests.support.mlflow_server import MlflowServer, mlflow_venv

    if not (mlflow_venv() / "bin" / "mlflow").exists():
        pytest.skip(f"no MLflow server at {mlflow_venv()}: run tools/mlflow-venv.sh")
    with MlflowServer(tmp_path_factory.mktemp("mlflow")) as server:
        yield server


def _namespace_name(node_name: str) -> str:
    slug = re.sub(r"[^a-z0-9-]+", "-", node_name.lower()).strip("-")[:40].strip("-") or "test"
    return f"kt-{slug}-{secrets.token_hex(3)}"


@pytest.fixture
def namespace(request: pytest.FixtureRequest, k8s_client: Any) -> Iterator[str]:
    """A fresh namespace for one test, deleted afterwards (the namespace controller empties it)."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    core = client.CoreV1Api(k8s_client)
    name = _namespace_name(request.node.name)
    core.create_namespace(
        {"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}},
        _preload_content=False,
        _request_timeout=30,
    )
    yield name
    try:
        core.delete_namespace(name, _preload_content=False, _request_timeout=30)
    except ApiException as e:
        if e.status != 404:
            raise
