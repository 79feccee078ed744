"""A small JSON-over-REST client for the local runtime: get, list, patch, update status, post Events.

Why raw paths and dicts (not the generated client models): the runtime touches custom resources (RayJobs),
core objects and status subresources alike, and the generated models of `kubernetes==36` do not match the
v1.20 server (see kubeclient.py). Errors surface as `RestError` with the HTTP status.
"""

from __future__ import annotations

import json
import time
import uuid
from pathlib import Path
from typing import Any

from kubetune_cli.localenv.kubeclient import api_client


class RestError(RuntimeError):
    def __init__(self, status: int | None, message: str) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status


class Rest:
    """Shared by the runtime's threads (the ApiClient's urllib3 pool is thread-safe)."""

    def __init__(self, kubeconfig: str | Path) -> None:
        self.api = api_client(kubeconfig)

    def close(self) -> None:
        self.api.close()

    def call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        from kubernetes.client.rest import ApiException

        try:
            resp = self.api.call_api(path, method, header_params={"Accept": "application/json",
                                                                  "Content-Type": content_type},
                                     body=body, auth_settings=["BearerToken"], _preload_content=False,
                                     _request_timeout=30)
        except ApiException as e:
            raise RestError(e.status, _reason(e)) from None
        except Exception as e:  # noqa: BLE001 - connection errors while the API server restarts
            raise RestError(None, type(e).__name__) from None
        data = resp[0].data if isinstance(resp, tuple) else resp.data
        return json.loads(data) if data else {}

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

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str,
              component: str = "kubetune-dev-runtime") -> None:
        """Post an Event about `obj` (best effort: a failed Event never fails the runtime)."""
        meta = obj["metadata"]
        ns = meta.get("namespace", "default")
        now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
        body = {
            "apiVersion": "v1", "kind": "Event",
            "metadata": {"name": f"{meta['name']}.{uuid.uuid4().hex[:12]}", "namespace": ns},
            "involvedObject": {"apiVersion": obj.get("apiVersion"), "kind": obj.get("kind"), "name": meta["name"],
                               "namespace": ns, "uid": meta.get("uid")},
            "type": type_, "reason": reason, "message": message[:1024],
            "source": {"component": component}, "firstTimestamp": now, "lastTimestamp": now, "count": 1,
            "reportingComponent": component,
        }
        try:
            self.call("POST", f"/api/v1/namespaces/{ns}/events", body)
        except RestError:
            pass


def _reason(e: Any) -> str:
    try:
        return json.loads(e.body).get("message") or str(e.reason)
    except (TypeError, ValueError, AttributeError):
        return str(getattr(e, "reason", "")) or type(e).__name__
