"""Shared pytest fixtures: a real control plane (with KubeRay's CRDs) and a real S3 server per session.

Why session scope: the control plane takes ~8 s plus ~7 s for KubeRay's CRDs on a 2-core machine, so every
test shares one and isolates itself with the function-scoped `namespace` fixture. Servers start lazily:
a run of unit tests alone never starts them. Each fixture stops what it started (also when tests fail);
`kubetune_cli.localenv` additionally kills leftovers at interpreter exit and its children die with the process.

Set KUBECONFIG and KUBETUNE_TEST_EXISTING_CLUSTER=1 to run against an existing cluster instead.
"""

from __future__ import annotations

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
    core.create_namespace({"metadata": {"name": name, "labels": {"kubetune.io/test": "true"}}},
                          _preload_content=False, _request_timeout=30)
    yield name
    try:
        core.delete_namespace(name, _preload_content=False, _request_timeout=30)
    except ApiException as e:
        if e.status != 404:
            raise
