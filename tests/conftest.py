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
    config.stash[_TIER_SECONDS] = {}


# --- CI: a skipped real-component test is a failure ---------------------------------------------------------
# A test that needs a real component (an API server, SeaweedFS, Ray, vLLM) and skips because it is missing
# would pass CI while proving nothing. With CI set (CI=1 / CI=true, as .ci/run sets it) such a skip fails.
REAL_COMPONENT_TIERS = ("integration", "training", "serving", "e2e", "faults", "slow")
# The tiers of the timing line, in the order they are printed; a test counts under the first it carries.
TIERS = ("unit", "integration", "training", "serving", "e2e", "faults")
_TIER_SECONDS = pytest.StashKey[dict[str, list[float]]]()


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


def _tier(item: pytest.Item) -> str:
    marks = {m.name for m in item.iter_markers()}
    return next((t for t in reversed(TIERS) if t in marks), "unmarked")


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo[None]) -> Iterator[None]:
    outcome = yield
    report: pytest.TestReport = outcome.get_result()  # type: ignore[attr-defined]  # pluggy's Result, untyped here
    seconds = item.config.stash[_TIER_SECONDS].setdefault(_tier(item), [0.0, 0])
    seconds[0] += report.duration
    if report.when == "call":
        seconds[1] += 1
    real = any(item.get_closest_marker(name) for name in REAL_COMPONENT_TIERS)
    if in_ci() and report.skipped and real and not hasattr(report, "wasxfail"):
        reason = report.longrepr[2] if isinstance(report.longrepr, tuple) else str(report.longrepr)
        report.outcome = "failed"
        report.longrepr = f"CI: a real-component test may not skip ({reason})"


def pytest_terminal_summary(terminalreporter: Any, config: pytest.Config) -> None:
    """One line: seconds per tier (setup, call and teardown of its tests, session fixtures included)."""
    per_tier = config.stash.get(_TIER_SECONDS, {})
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
