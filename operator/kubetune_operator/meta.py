"""Metadata every child object carries: labels, annotations and the owner reference to its FineTuneJob.

Why an owner reference with controller=true and blockOwnerDeletion=true on every child: deleting the
FineTuneJob then removes everything it made through the garbage collector, without a finalizer (so deletion
never waits on the operator being up), and `kubectl get` tools show who controls what.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune import api
from kubetune_operator import names

LABEL_JOB = "kubetune.io/job"
ANNOTATION_SPEC_HASH = "kubetune.io/spec-hash"
LABEL_KUEUE_QUEUE = "kueue.x-k8s.io/queue-name"
MANAGED_BY = "kubetune-operator"


@dataclass(frozen=True)
class Owner:
    """The FineTuneJob a child belongs to."""

    name: str
    namespace: str
    uid: str

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> Owner:
        meta = body["metadata"]
        return cls(name=meta["name"], namespace=meta.get("namespace") or "default", uid=meta.get("uid") or "")

    def reference(self) -> dict[str, Any]:
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    def involved_object(self) -> dict[str, Any]:
        """How Events point at the job."""
        return {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "name": self.name,
            "namespace": self.namespace,
            "uid": self.uid,
        }


def labels(owner: Owner, component: str) -> dict[str, str]:
    """Recommended app.kubernetes.io labels plus kubetune.io/job for selecting a job's children."""
    job = names.label_value(owner.name)
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": job,
        "app.kubernetes.io/component": component,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_JOB: job,
    }


def object_meta(owner: Owner, name: str, component: str, **extra_labels: str) -> dict[str, Any]:
    """metadata for a namespaced child of `owner`."""
    return {
        "name": name,
        "namespace": owner.namespace,
        "labels": {**labels(owner, component), **extra_labels},
        "ownerReferences": [owner.reference()],
    }


def controller_of(obj: dict[str, Any]) -> str | None:
    """The name of the FineTuneJob that controls `obj`, from its owner references."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if (
            ref.get("controller")
            and ref.get("kind") == api.KIND
            and ref.get("apiVersion", "").startswith(f"{api.GROUP}/")
        ):
            name: str | None = ref.get("name")
            return name
    return None
