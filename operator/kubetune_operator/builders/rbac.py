"""The trainer's identity: a ServiceAccount and a Role that reaches exactly one object, its own FineTuneJob.

Why so narrow: the trainer runs user-chosen code and data on possibly shared clusters; all it needs from the
API is to read its job and report progress through the status subresource. `resourceNames` pins both rules to
this job, so a trainer can neither read nor write any other job, and cannot change its own spec.
"""

from __future__ import annotations

from typing import Any

from kubetune import api
from kubetune_operator import names
from kubetune_operator.meta import Owner, object_meta


def service_account(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ServiceAccount",
        "metadata": object_meta(owner, names.service_account(owner.name), "training"),
    }


def role(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "Role",
        "metadata": object_meta(owner, names.role(owner.name), "training"),
        "rules": [
            {
                "apiGroups": [api.GROUP],
                "resources": [api.PLURAL],
                "resourceNames": [owner.name],
                "verbs": ["get"],
            },
            {
                "apiGroups": [api.GROUP],
                "resources": [f"{api.PLURAL}/status"],
                "resourceNames": [owner.name],
                "verbs": ["get", "patch"],
            },
        ],
    }


def role_binding(owner: Owner) -> dict[str, Any]:
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": object_meta(owner, names.role_binding(owner.name), "training"),
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": names.role(owner.name)},
        "subjects": [
            {"kind": "ServiceAccount", "name": names.service_account(owner.name), "namespace": owner.namespace}
        ],
    }
