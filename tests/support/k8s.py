"""The Kubernetes side of the trainer tests: the CRD, a FineTuneJob, and the trainer's own identity.

The trainer reports as the ServiceAccount the operator gives it, with the operator's own Role (built by
`kubetune_operator.builders.rbac`), so these tests also check that the Role allows exactly what the trainer
does: a JSON merge patch of its own job's status subresource.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from kubetune import api

REPO = Path(__file__).resolve().parents[2]


def install_finetunejob_crd(control_plane: Any) -> None:
    control_plane.install_crds([REPO / "crds" / "finetunejob.yaml"])


def create_job(k8s_client: Any, namespace: str, name: str, model_uri: str) -> dict[str, Any]:
    from kubernetes import client

    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": {
            "model": {"uri": model_uri},
            "dataset": {"train": "s3://kubetune-test/data/x.jsonl", "format": "completion"},
            "output": {"uri": "s3://kubetune-test/runs"},
            "deploy": {"enabled": False},
        },
    }
    return client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body
    )


def get_job(k8s_client: Any, namespace: str, name: str) -> dict[str, Any]:
    from kubernetes import client

    return client.CustomObjectsApi(k8s_client).get_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, name
    )


def trainer_kubeconfig(control_plane: Any, k8s_client: Any, job: dict[str, Any]) -> Path:
    """A kubeconfig for the job's trainer ServiceAccount, bound to the operator's trainer Role."""
    from kubernetes import client

    from kubetune_operator.builders import rbac
    from kubetune_operator.meta import Owner

    owner = Owner.from_body(job)
    sa, role, binding = rbac.service_account(owner), rbac.role(owner), rbac.role_binding(owner)
    client.CoreV1Api(k8s_client).create_namespaced_service_account(owner.namespace, sa)
    rbac_api = client.RbacAuthorizationV1Api(k8s_client)
    rbac_api.create_namespaced_role(owner.namespace, role)
    rbac_api.create_namespaced_role_binding(owner.namespace, binding)
    return control_plane.kubeconfig_for_service_account(owner.namespace, sa["metadata"]["name"], create=False)


def wait_for_status(k8s_client: Any, namespace: str, name: str, check: Any, timeout: float = 30.0) -> dict:
    deadline = time.monotonic() + timeout
    status: dict[str, Any] = {}
    while time.monotonic() < deadline:
        status = get_job(k8s_client, namespace, name).get("status") or {}
        if check(status):
            return status
        time.sleep(0.3)
    raise AssertionError(f"status never matched; last: {status}")
