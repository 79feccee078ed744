"""A small JSON-over-REST client for the local runtime: get, list, patch, update status, post Events.

Why raw paths and dicts (not the generated client models): the runtime touches custom resources (RayJobs),
core objects and status subresources alike, and the generated models of `kubernetes==36` do not match the
v1.20 server (see kubetune/kubeclient.py, which builds the client and makes the calls). Errors surface as
`RestError` with the HTTP status.
"""

from __future__ import annotations

import contextlib
import uuid
from pathlib import Path
from typing import Any

from kubetune import kubeclient
from kubetune.clock import now_rfc3339


class RestError(RuntimeError):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Rest:
    """Shared by the runtime's threads (the ApiClient's urllib3 pool is thread-safe)."""

    def __init__(self, kubeconfig: str | Path) -> None:
        self.api = kubeclient.api_client(kubeconfig)

    def close(self) -> None:
        self.api.close()

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        try:
            return kubeclient.call_json(self.api, method, path, body, content_type=content_type)
        except ApiException as e:
            raise RestError(e.status, kubeclient.error_message(e)) from None
        except Exception as e:  # noqa: BLE001 - connection errors while the API server restarts
            raise RestError(None, type(e).__name__) from None

    def get(self, path: str) -> dict[str, Any] | None:
        try:
            return self.call("GET", path)
        except RestError as e:
            if e.status == 404:
                return None
            raise

    def items(self, path: str) -> list[dict[str, Any]]:
        return self.call("GET", path).get("items") or []

    def merge_patch(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        return self.call("PATCH", path, body, "application/merge-patch+json")

    def event(
        self, obj: dict[str, Any], type_: str, reason: str, message: str, component: str = "kubetune-dev-runtime"
    ) -> None:
        """Post an Event about `obj` (best effort: a failed Event never fails the runtime)."""
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        now = now_rfc3339()
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {
                "apiVersion": obj.get("apiVersion"),
                "kind": obj.get("kind"),
                "name": meta["name"],
                "namespace": ns,
                "uid": meta.get("uid"),
            },
            "type": type_,
            "reason": reason,
            "message": message[:1024],
            "source": {"component": component},
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
            "reportingComponent": component,
        }
        with contextlib.suppress(RestError):
            self.call("POST", f"/api/v1/namespaces/{ns}/events", body)
