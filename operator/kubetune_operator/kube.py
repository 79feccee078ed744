"""The one module of the operator that talks to the Kubernetes API (kopf's own watching aside).

Why plain JSON over the official client's REST layer instead of its typed models: the operator handles a
custom resource and KubeRay's RayJob, for which the client has no models anyway, and the v36 client's models
are generated for a much newer API than some clusters run (a v1.20 server in tests); dicts in, dicts out is
robust against that skew and keeps one code path for every kind.

What it offers is what reconciling needs and no more: idempotent creates (409 means "already there": the
existing object is returned, never a second one made; but only when its controller ownerReference is the
same owner as the object we tried to create: anything else by that name raises `NotOwned` and is left
untouched, so a job never adopts, patches or runs with an object it did not make), get, JSON merge patches of an object or of its status
subresource, replace (PUT) of an object whose spec the operator owns whole, delete, and Events. Every request is counted (`requests`), for the operator's metrics and the benchmark.
Errors carry the API's status code and reason; they never include request bodies.
"""

from __future__ import annotations

import json
import logging
import socket
import threading
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kubernetes import client
from kubernetes.client.rest import ApiException

from kubetune import api, kubeclient
from kubetune.clock import now_rfc3339

log = logging.getLogger(__name__)

MERGE_PATCH = "application/merge-patch+json"


@dataclass(frozen=True)
class Kind:
    """Where a kind lives in the REST API."""

    api_version: str
    kind: str
    plural: str

    def path(self, namespace: str | None, name: str | None = None, subresource: str | None = None) -> str:
        group_path = "/api/v1" if self.api_version == "v1" else f"/apis/{self.api_version}"
        parts = [group_path]
        if namespace is not None:
            parts.append(f"namespaces/{namespace}")
        parts.append(self.plural)
        if name is not None:
            parts.append(name)
        if subresource is not None:
            parts.append(subresource)
        return "/".join(parts)


KINDS = {
    (k.api_version, k.kind): k
    for k in (
        Kind("v1", "ConfigMap", "configmaps"),
        Kind("v1", "ServiceAccount", "serviceaccounts"),
        Kind("v1", "Service", "services"),
        Kind("v1", "Secret", "secrets"),
        Kind("v1", "Event", "events"),
        Kind("apps/v1", "Deployment", "deployments"),
        Kind("rbac.authorization.k8s.io/v1", "Role", "roles"),
        Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings"),
        Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies"),
        Kind("ray.io/v1", "RayJob", "rayjobs"),
        Kind(api.API_VERSION, api.KIND, api.PLURAL),
    )
}
FINETUNEJOB = KINDS[(api.API_VERSION, api.KIND)]
RAYJOB = KINDS[("ray.io/v1", "RayJob")]
CONFIGMAP = KINDS[("v1", "ConfigMap")]
DEPLOYMENT = KINDS[("apps/v1", "Deployment")]
SERVICE = KINDS[("v1", "Service")]


def kind_of(obj: dict[str, Any]) -> Kind:
    return KINDS[(obj["apiVersion"], obj["kind"])]


class KubeError(RuntimeError):
    """An API request failed; `status` is the HTTP status (0 when the server was not reached)."""

    def __init__(self, status: int, reason: str, message: str):
        self.status = status
        self.reason = reason
        super().__init__(f"{status} {reason}: {message}" if status else message)


class NotOwned(KubeError):
    """An object by the name we wanted exists and is not controlled by our owner; it is left untouched."""

    def __init__(self, kind: str, namespace: str, name: str, controller: str | None):
        self.kind, self.namespace, self.name, self.controller = kind, namespace, name, controller
        by = f"is controlled by {controller}" if controller else "has no controller"
        super().__init__(409, "NotOwned", f"{kind} {namespace}/{name} already exists and {by}")


def controller_ref(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The ownerReference with controller=true, if any."""
    for ref in (obj.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return cast("dict[str, Any]", ref)
    return None


def check_owned(existing: dict[str, Any], wanted: dict[str, Any]) -> None:
    """Raise NotOwned unless `existing` has the controller ownerReference `wanted` carries (if it carries one)."""
    want = controller_ref(wanted)
    if want is None:
        return
    have = controller_ref(existing)
    if have is not None and have.get("uid") == want.get("uid"):
        return
    meta = existing.get("metadata") or {}
    who = f"{have.get('kind')} {have.get('name')}" if have else None
    raise NotOwned(wanted["kind"], meta.get("namespace", ""), meta.get("name", ""), who)


def _error(e: ApiException, what: str) -> KubeError:
    reason, message = e.reason or "", ""
    try:
        body = json.loads(e.body or "{}")
        reason = body.get("reason") or reason
        message = body.get("message") or ""
    except (ValueError, TypeError):
        pass
    return KubeError(e.status or 0, reason, f"{what}: {message}" if message else what)


def load_configuration(kubeconfig: str | Path | None = None) -> client.Configuration:
    """Credentials: the given kubeconfig; else in-cluster; else $KUBECONFIG / ~/.kube/config.

    With the kubernetes==36 bearer-token fix applied (kubetune.kubeclient, the one copy of it).
    """
    return kubeclient.load_configuration(kubeconfig)


class Kube:
    """A small, thread-safe JSON client for the operator's needs."""

    def __init__(self, configuration: client.Configuration, *, pool_size: int = 16, timeout: float = 30.0):
        configuration.connection_pool_maxsize = max(pool_size, configuration.connection_pool_maxsize or 0)
        self.configuration = configuration
        self._api = client.ApiClient(configuration)
        self._timeout = timeout
        self._lock = threading.Lock()
        self.requests: Counter[str] = Counter()
        self.component = "kubetune-operator"
        self.instance = socket.gethostname()

    def close(self) -> None:
        self._api.close()

    # --- plumbing ---------------------------------------------------------------------------------------

    def _call(
        self,
        verb: str,
        method: str,
        path: str,
        body: Any = None,
        content_type: str = "application/json",
        query: list[tuple[str, str]] | None = None,
    ) -> dict[str, Any]:
        with self._lock:
            self.requests[verb] += 1
        return kubeclient.call_json(
            self._api, method, path, body, content_type=content_type, query=query, timeout=self._timeout
        )

    # --- objects ----------------------------------------------------------------------------------------

    def get(self, kind: Kind, namespace: str, name: str) -> dict[str, Any] | None:
        """The object, or None when it does not exist."""
        try:
            return self._call("get", "GET", kind.path(namespace, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise _error(e, f"get {kind.kind} {namespace}/{name}") from None

    def list(
        self,
        kind: Kind,
        namespace: str | None = None,
        label_selector: str | None = None,
        field_selector: str | None = None,
    ) -> list[dict[str, Any]]:
        """Every object of `kind` in `namespace` (None: all namespaces), optionally only those matching
        `label_selector` / `field_selector` (one request, no paging: small sets)."""
        query = [(k, v) for k, v in (("labelSelector", label_selector), ("fieldSelector", field_selector)) if v]
        try:
            return self._call("list", "GET", kind.path(namespace), query=query or None).get("items") or []
        except ApiException as e:
            raise _error(e, f"list {kind.kind} in {namespace or 'all namespaces'}") from None

    def get_secret_keys(self, namespace: str, name: str) -> dict[str, Any] | None:
        """A Secret with only the names of its keys ({"data": {key: ""}}): the values are dropped here, at
        once, so that nothing downstream can log or store them. None when it does not exist."""
        secret = self.get(KINDS[("v1", "Secret")], namespace, name)
        if secret is None:
            return None
        keys = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
        return {"metadata": {"name": name, "namespace": namespace}, "data": {k: "" for k in sorted(keys)}}

    def create(self, obj: dict[str, Any]) -> tuple[dict[str, Any], bool]:
        """Create `obj`; if it exists already and has the same controller, return it. (object, created).

        Raises NotOwned when the existing object belongs to someone else."""
        kind, meta = kind_of(obj), obj["metadata"]
        try:
            return self._call("create", "POST", kind.path(meta["namespace"]), body=obj), True
        except ApiException as e:
            if e.status != 409:
                raise _error(e, f"create {kind.kind} {meta['namespace']}/{meta['name']}") from None
        existing = self.get(kind, meta["namespace"], meta["name"])
        if existing is None:  # deleted between the two calls: try once more
            return self.create(obj)
        check_owned(existing, obj)
        return existing, False

    def ensure(self, obj: dict[str, Any]) -> bool:
        """Create `obj` unless it exists; True when this call created it.

        A new object costs one request. On 409 the existing one is read to check its controller: our own is
        fine (False), anyone else's raises NotOwned (never patched, never used)."""
        return self.create(obj)[1]

    def patch(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any]:
        """JSON merge patch of the object."""
        try:
            return self._call("patch", "PATCH", kind.path(namespace, name), body=patch, content_type=MERGE_PATCH)
        except ApiException as e:
            raise _error(e, f"patch {kind.kind} {namespace}/{name}") from None

    def replace(self, obj: dict[str, Any]) -> dict[str, Any]:
        """PUT `obj`: with metadata.resourceVersion a concurrent change fails with 409; without, it is replaced.

        For objects whose spec the operator owns whole (the inference Deployment): a merge patch cannot drop a
        key the new spec no longer has (e.g. the GPU limit when a deployment moves to CPU), a replace does.
        """
        kind, meta = kind_of(obj), obj["metadata"]
        try:
            return self._call("replace", "PUT", kind.path(meta["namespace"], meta["name"]), body=obj)
        except ApiException as e:
            raise _error(e, f"replace {kind.kind} {meta['namespace']}/{meta['name']}") from None

    def patch_status(self, kind: Kind, namespace: str, name: str, patch: dict[str, Any]) -> dict[str, Any] | None:
        """JSON merge patch of the status subresource; None when the object is gone."""
        try:
            return self._call(
                "patch_status",
                "PATCH",
                kind.path(namespace, name, "status"),
                body={"status": patch},
                content_type=MERGE_PATCH,
            )
        except ApiException as e:
            if e.status == 404:
                return None
            raise _error(e, f"patch {kind.kind} {namespace}/{name} status") from None

    def delete(self, kind: Kind, namespace: str, name: str) -> bool:
        try:
            self._call("delete", "DELETE", kind.path(namespace, name), body={"propagationPolicy": "Background"})
            return True
        except ApiException as e:
            if e.status == 404:
                return False
            raise _error(e, f"delete {kind.kind} {namespace}/{name}") from None

    # --- events -----------------------------------------------------------------------------------------

    def post_event(self, involved: dict[str, Any], type_: str, reason: str, message: str) -> None:
        """A core/v1 Event about `involved` (best effort: a lost Event must not fail a reconcile)."""
        now = now_rfc3339()
        namespace = involved["namespace"]
        event = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{involved['name'][:200]}.{uuid.uuid4().hex[:16]}", "namespace": namespace},
            "involvedObject": involved,
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": self.component},
            "reportingComponent": f"kubetune.io/{self.component}",
            "reportingInstance": self.instance[:128],
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        try:
            self._call("event", "POST", KINDS[("v1", "Event")].path(namespace), body=event)
        except ApiException as e:
            log.warning(
                "could not post Event %s for %s/%s: %s",
                reason,
                namespace,
                involved.get("name"),
                _error(e, "post Event"),
            )
