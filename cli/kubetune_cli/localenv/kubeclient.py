"""Thin helpers over the official `kubernetes` client, shared by the control plane and CRD installers.

Why raw JSON (`_preload_content=False`): the v36 client's models are generated for a far newer API than the
local v1.20 server; deserialising e.g. a CustomResourceDefinition into models can trip over fields one side
lacks. Plain dicts in and out are robust against that skew.

Trap: `kubernetes==36.0.0` loads a kubeconfig token into `api_key["authorization"]` but its `auth_settings()`
only looks for `api_key["BearerToken"]`, so every request goes out as `system:anonymous`
(kubernetes-client/python#2592). `fix_bearer_auth` patches a Configuration; `api_client` applies it.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import yaml


def fix_bearer_auth(configuration: Any) -> Any:
    """Make `configuration` send its kubeconfig bearer token again (see the module docstring); idempotent."""
    if getattr(configuration, "_kubetune_bearer_fixed", False):
        return configuration
    original = configuration.auth_settings

    def auth_settings() -> dict[str, Any]:
        auth: dict[str, Any] = original()
        if "BearerToken" not in auth:
            if configuration.refresh_api_key_hook is not None:  # exec/oidc plugins refresh the token here
                configuration.refresh_api_key_hook(configuration)
            token = configuration.api_key.get("authorization")
            if token:
                prefix = configuration.api_key_prefix.get("authorization")
                value = f"{prefix} {token}" if prefix and not token.startswith(prefix) else token
                auth["BearerToken"] = {"type": "api_key", "in": "header", "key": "authorization", "value": value}
        return auth

    configuration.auth_settings = auth_settings
    configuration._kubetune_bearer_fixed = True
    return configuration


def api_client(kubeconfig: str | Path, context: str | None = None) -> Any:
    """A `kubernetes.client.ApiClient` for `kubeconfig` (not the global default configuration)."""
    from kubernetes import config

    api = config.new_client_from_config(config_file=str(kubeconfig), context=context)
    fix_bearer_auth(api.configuration)
    return api


def as_dict(response: Any) -> dict[str, Any]:
    """Decode a `_preload_content=False` response."""
    data: dict[str, Any] = json.loads(response.data)
    return data


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
