"""The Deployment controller's and kubelets' part, played against a real API server: Deployment status as
kube-controller-manager writes it once (or while, or because not) the pods are ready.

Why: the local control plane runs kube-controller-manager with only the garbage collector, namespace and
service-account controllers, and no node runs pods, so nothing would ever write a Deployment's status. Tests
of what reads that status (the operator's `Deployed` condition) write it here, field for field as the
Deployment controller does (kubernetes pkg/controller/deployment: `syncRolloutStatus`, `calculateStatus`,
util/deployment_util.go `NewDeploymentCondition`, the reasons and messages below), with an update of the
status subresource.

`deployment_status` is the pure part (unit-testable); `DeploymentController` applies it to a Deployment in
the API server:

    with DeploymentController(kubeconfig) as dc:
        dc.progressing(ns, name)            # new ReplicaSet created, pods not ready yet
        dc.available(ns, name)              # every replica ready and available
        dc.progress_deadline_exceeded(ns, name)
        dc.replica_failure(ns, name, 'pods "x" is forbidden: exceeded quota: gpu')

`mark_deployment_available(kubeconfig, ns, name)` is the one-line form of `available`.

Not modelled: ReplicaSets and pods themselves, partial rollouts across several old ReplicaSets, paused
Deployments, minReadySeconds (all replicas become available at the moment they are ready).
"""

from __future__ import annotations

import hashlib
import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune import kubeclient
from kubetune.clock import rfc3339

# util/deployment_util.go
AVAILABLE = "Available"
PROGRESSING = "Progressing"
REPLICA_FAILURE = "ReplicaFailure"
MIN_AVAILABLE = "MinimumReplicasAvailable"
MIN_UNAVAILABLE = "MinimumReplicasUnavailable"
NEW_RS_CREATED = "NewReplicaSetCreated"
RS_UPDATED = "ReplicaSetUpdated"
NEW_RS_AVAILABLE = "NewReplicaSetAvailable"
TIMED_OUT = "ProgressDeadlineExceeded"
FAILED_CREATE = "FailedCreate"
_ALPHANUMS = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand SafeEncodeString


def replica_set_name(deployment: dict[str, Any]) -> str:
    """`<deployment>-<pod-template-hash>`: a stable hash of the pod template, in the controller's alphabet."""
    template = json.dumps((deployment.get("spec") or {}).get("template") or {}, sort_keys=True)
    digest = hashlib.sha256(template.encode()).digest()
    return f"{deployment['metadata']['name']}-" + "".join(_ALPHANUMS[b % len(_ALPHANUMS)] for b in digest[:10])


def _condition(
    old: list[dict[str, Any]], type_: str, status: str, reason: str, message: str, now: str
) -> dict[str, Any]:
    prev = next((c for c in old if c.get("type") == type_), None)
    # SetDeploymentCondition keeps lastTransitionTime when the status did not change.
    transition = prev["lastTransitionTime"] if prev is not None and prev.get("status") == status else now
    return {
        "type": type_,
        "status": status,
        "lastUpdateTime": now,
        "lastTransitionTime": transition,
        "reason": reason,
        "message": message,
    }


def deployment_status(
    deployment: dict[str, Any],
    *,
    ready: int | None = None,
    timed_out: bool = False,
    failure: str | None = None,
    now: datetime | None = None,
) -> dict[str, Any]:
    """The status the Deployment controller writes when `ready` of the new ReplicaSet's pods are ready (all of
    them when None, none when failing), or when the rollout timed out, or when pods cannot be created (`failure`: the
    ReplicaSet's FailedCreate message)."""
    spec = deployment.get("spec") or {}
    replicas = int(spec.get("replicas", 1))
    if ready is None:
        ready = 0 if failure or timed_out else replicas
    ready_n = max(0, min(int(ready), replicas))
    when = rfc3339(now or datetime.now(UTC))
    old = list((deployment.get("status") or {}).get("conditions") or [])
    rs = replica_set_name(deployment)
    # RollingUpdate maxUnavailable (absolute, or a percentage rounded down); the Deployment is Available when
    # availableReplicas >= replicas - maxUnavailable.
    strategy = (spec.get("strategy") or {}).get("rollingUpdate") or {}
    max_unavailable = strategy.get("maxUnavailable", "25%")
    if isinstance(max_unavailable, str) and max_unavailable.endswith("%"):
        max_unavailable = replicas * int(max_unavailable[:-1]) // 100
    min_available = replicas - int(max_unavailable)
    conditions: list[dict[str, Any]] = []
    if ready_n >= min_available:
        conditions.append(
            _condition(old, AVAILABLE, "True", MIN_AVAILABLE, "Deployment has minimum availability.", when)
        )
    else:
        conditions.append(
            _condition(old, AVAILABLE, "False", MIN_UNAVAILABLE, "Deployment does not have minimum availability.", when)
        )
    if timed_out:
        conditions.append(
            _condition(old, PROGRESSING, "False", TIMED_OUT, f'ReplicaSet "{rs}" has timed out progressing.', when)
        )
    elif ready_n == replicas:
        conditions.append(
            _condition(
                old, PROGRESSING, "True", NEW_RS_AVAILABLE, f'ReplicaSet "{rs}" has successfully progressed.', when
            )
        )
    elif not any(c.get("type") == PROGRESSING for c in old):
        conditions.append(_condition(old, PROGRESSING, "True", NEW_RS_CREATED, f'Created new replica set "{rs}"', when))
    else:
        conditions.append(_condition(old, PROGRESSING, "True", RS_UPDATED, f'ReplicaSet "{rs}" is progressing.', when))
    if failure:
        conditions.append(_condition(old, REPLICA_FAILURE, "True", FAILED_CREATE, failure, when))
    created = 0 if failure else replicas
    status: dict[str, Any] = {
        "observedGeneration": deployment["metadata"].get("generation", 1),
        "replicas": created,
        "updatedReplicas": created,
        "readyReplicas": ready_n,
        "availableReplicas": ready_n,
        "unavailableReplicas": replicas - ready_n,
        "conditions": conditions,
    }
    # The controller omits zero counts (omitempty).
    return {k: v for k, v in status.items() if v not in (0, None)}


class DeploymentController:
    """Writes Deployment status into a real API server the way kube-controller-manager would."""

    def __init__(self, kubeconfig: str | Path):
        self._api = kubeclient.api_client(kubeconfig)

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> DeploymentController:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def _path(self, namespace: str, name: str, sub: str = "") -> str:
        return f"/apis/apps/v1/namespaces/{namespace}/deployments/{name}" + (f"/{sub}" if sub else "")

    def _call(self, method: str, path: str, body: Any = None) -> dict[str, Any]:
        return kubeclient.call_json(self._api, method, path, body)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call("GET", self._path(namespace, name))

    def _write(self, namespace: str, name: str, **kw: Any) -> dict[str, Any]:
        deployment = self.get(namespace, name)
        deployment["status"] = deployment_status(deployment, **kw)
        return self._call("PUT", self._path(namespace, name, "status"), deployment)

    def progressing(self, namespace: str, name: str, ready: int = 0) -> dict[str, Any]:
        """The new ReplicaSet's pods exist; `ready` of them are ready."""
        return self._write(namespace, name, ready=ready)

    def available(self, namespace: str, name: str) -> dict[str, Any]:
        """Every replica is ready and available: the rollout is complete."""
        return self._write(namespace, name)

    def progress_deadline_exceeded(self, namespace: str, name: str, ready: int = 0) -> dict[str, Any]:
        return self._write(namespace, name, ready=ready, timed_out=True)

    def replica_failure(self, namespace: str, name: str, message: str) -> dict[str, Any]:
        return self._write(namespace, name, ready=0, failure=message)


def mark_deployment_available(kubeconfig: str | Path, namespace: str, name: str) -> dict[str, Any]:
    """Write the status of a Deployment whose pods are all ready and available (see DeploymentController)."""
    with DeploymentController(kubeconfig) as dc:
        return dc.available(namespace, name)


__all__ = ["DeploymentController", "deployment_status", "mark_deployment_available", "replica_set_name"]
