"""Kubeconfig files for the local runtime: read one, write a single-context token one, find its current cluster.

The API client itself (credentials, the kubernetes==36 bearer-token fix, JSON calls) is the core's
`kubetune.kubeclient`; `api_client` and `as_dict` are re-exported here for the modules that imported them from
this one before the two were folded together.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

from kubetune.kubeclient import api_client, as_dict

__all__ = ["api_client", "as_dict", "current_cluster", "load_kubeconfig", "write_kubeconfig"]


def load_kubeconfig(path: str | Path) -> dict[str, Any]:
    return yaml.safe_load(Path(path).read_text()) or {}


def write_kubeconfig(
    path: Path,
    *,
    server: str,
    token: str,
    ca_data_b64: str | None,
    user: str,
    cluster: str = "kubetune-local",
    namespace: str = "default",
) -> Path:
    """Write a single-context token kubeconfig (CA embedded so the file stands alone)."""
    cluster_entry: dict[str, Any] = {"server": server}
    if ca_data_b64:
        cluster_entry["certificate-authority-data"] = ca_data_b64
    else:
        cluster_entry["insecure-skip-tls-verify"] = True
    context = f"{user}@{cluster}"
    doc = {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": cluster, "cluster": cluster_entry}],
        "users": [{"name": user, "user": {"token": token}}],
        "contexts": [{"name": context, "context": {"cluster": cluster, "user": user, "namespace": namespace}}],
        "current-context": context,
        "preferences": {},
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(yaml.safe_dump(doc, sort_keys=False))
    path.chmod(0o600)
    return path


def current_cluster(kubeconfig: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """(cluster name, cluster entry) of the current context."""
    ctx_name = kubeconfig.get("current-context")
    contexts = {c["name"]: c.get("context", {}) for c in kubeconfig.get("contexts") or []}
    if ctx_name not in contexts:
        raise ValueError(f"kubeconfig current-context {ctx_name!r} is not among its contexts")
    cluster_name = contexts[ctx_name].get("cluster")
    clusters = {c["name"]: c.get("cluster", {}) for c in kubeconfig.get("clusters") or []}
    if cluster_name not in clusters:
        raise ValueError(f"kubeconfig context {ctx_name!r} names unknown cluster {cluster_name!r}")
    return cluster_name, clusters[cluster_name]
