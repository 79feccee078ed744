"""The NetworkPolicy that fences a job's Ray head: only the job's own pods, and the operators, reach it.

Why: the head's ports (GCS 6379, dashboard/job API 8265, Ray client 10001) run arbitrary code for whoever
connects, on pods that hold the job's S3 keys; by default every pod of the cluster network could connect.
The policy selects the head pod of this job (KubeRay labels it `ray.io/node-type: head`; our pod template
labels carry `kubetune.io/job`) and admits:
- every port from the job's own pods: its Ray workers (which also use the raylet's and object manager's
  ports) and KubeRay's submitter Job (the batch Job controller labels its pods `job-name: <RayJob name>`);
- the dashboard/job API, GCS and client ports from KubeRay's operator (it reads job status from the
  dashboard) and from the kubetune operator, in the namespaces the settings name (any namespace when unset:
  Kubernetes 1.20 does not label namespaces with their name, so a namespace selector needs a label an
  administrator set).
Ray's token authentication (`rayClusterSpec.authOptions`, see builders.rayjob) is the second lock on the same
door. A cluster without a NetworkPolicy controller ignores the object; it does no harm there.
"""

from __future__ import annotations

from typing import Any

from kubetune_operator import names
from kubetune_operator.meta import LABEL_JOB, Owner, object_meta
from kubetune_operator.settings import Settings

HEAD_PORT_NUMBERS = (6379, 8265, 10001)
NAMESPACE_NAME_LABEL = "kubernetes.io/metadata.name"


def _peer(pod_labels: dict[str, str], namespace: str | None) -> dict[str, Any]:
    return {
        "namespaceSelector": {"matchLabels": {NAMESPACE_NAME_LABEL: namespace}} if namespace else {},
        "podSelector": {"matchLabels": pod_labels},
    }


def head_network_policy(owner: Owner, settings: Settings) -> dict[str, Any]:
    job_label = names.label_value(owner.name)
    return {
        "apiVersion": "networking.k8s.io/v1",
        "kind": "NetworkPolicy",
        "metadata": object_meta(owner, names.network_policy(owner.name), "training"),
        "spec": {
            "podSelector": {"matchLabels": {LABEL_JOB: job_label, "ray.io/node-type": "head"}},
            "policyTypes": ["Ingress"],
            "ingress": [
                {
                    "from": [
                        {"podSelector": {"matchLabels": {LABEL_JOB: job_label}}},
                        {"podSelector": {"matchLabels": {"job-name": names.ray_job(owner.name)}}},
                    ]
                },
                {
                    "from": [
                        _peer({"app.kubernetes.io/name": "kuberay-operator"}, settings.kuberay_namespace),
                        _peer(
                            {"app.kubernetes.io/name": "kubetune", "app.kubernetes.io/component": "operator"},
                            settings.operator_namespace,
                        ),
                    ],
                    "ports": [{"protocol": "TCP", "port": p} for p in HEAD_PORT_NUMBERS],
                },
            ],
        },
    }
