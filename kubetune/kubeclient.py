"""The one way kubetune builds a Kubernetes API client: credentials, the kubernetes==36 bearer-token fix, JSON calls.

Used by the operator (kubetune_operator.kube), the trainer's status reporter and the CLI / local runtime, so there
is one copy of each trap's workaround. `kubernetes` is imported lazily: the core's own dependencies are pydantic
and PyYAML, and only the components that talk to an API server install the client.

Why plain JSON (`_preload_content=False`) and not the client's typed models: kubetune handles custom resources
(FineTuneJob, KubeRay's RayJob) for which the client has no models, and the v36 models are generated for a much
newer API than some clusters run (a v1.20 server in tests); dicts in, dicts out is robust against that skew.

Trap: `kubernetes==36.0.0` loads a token (kubeconfig and in-cluster alike) into `api_key["authorization"]` while
its `auth_settings()` only sends `api_key["BearerToken"]`, so every request would go out as `system:anonymous`
(kubernetes-client/python#2592). `fix_bearer_auth` patches a Configuration; every constructor here applies it.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

MERGE_PATCH = "application/merge-patch+json"
DEFAULT_TIMEOUT = 30.0


def fix_bearer_auth(configuration: Any) -> Any:
    """Make `configuration` send its bearer token again (see the module docstring); idempotent.

    Reading through `get_api_key_with_prefix` runs the loaders' refresh hook first, so rotating in-cluster tokens
    and exec/OIDC plugins keep working.
    """
    if getattr(configuration, "_kubetune_bearer_fixed", False):
        return configuration
    original = configuration.auth_settings

    def auth_settings() -> dict[str, Any]:
        auth: dict[str, Any] = original()
        if "BearerToken" not in auth:
            value = configuration.get_api_key_with_prefix("authorization")
            if value:
                auth["BearerToken"] = {"type": "api_key", "in": "header", "key": "authorization", "value": value}
        return auth

    configuration.auth_settings = auth_settings
    configuration._kubetune_bearer_fixed = True
    return configuration


def load_configuration(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    in_cluster: bool = True,
    default_kubeconfig: bool = True,
) -> Any:
    """A `kubernetes.client.Configuration` with the token fix applied (never the client's global default).

    Credentials: the given kubeconfig; else (`in_cluster`) the pod's ServiceAccount; else (`default_kubeconfig`)
    $KUBECONFIG / ~/.kube/config. Callers name the kubeconfig explicitly because the client reads $KUBECONFIG
    only once, when it is first imported. Raises `kubernetes.config.ConfigException` when none is there.
    """
    from kubernetes import client, config

    cfg = client.Configuration()
    if kubeconfig is not None:
        config.load_kube_config(config_file=str(kubeconfig), context=context, client_configuration=cfg)
        return fix_bearer_auth(cfg)
    if in_cluster:
        try:
            config.load_incluster_config(client_configuration=cfg)
            return fix_bearer_auth(cfg)
        except config.ConfigException:
            if not default_kubeconfig:
                raise
    config.load_kube_config(context=context, client_configuration=cfg)
    return fix_bearer_auth(cfg)


def api_client(
    kubeconfig: str | os.PathLike[str] | None = None,
    *,
    context: str | None = None,
    configuration: Any = None,
    pool_size: int | None = None,
) -> Any:
    """A `kubernetes.client.ApiClient` (close it, or use it as a context manager).

    From `configuration` when given (the fix is applied to it), else from `load_configuration(kubeconfig)`.
    `pool_size` raises urllib3's connection pool for clients shared by many threads.
    """
    from kubernetes import client

    cfg = (
        fix_bearer_auth(configuration) if configuration is not None else load_configuration(kubeconfig, context=context)
    )
    if pool_size is not None:
        cfg.connection_pool_maxsize = max(pool_size, cfg.connection_pool_maxsize or 0)
    return client.ApiClient(cfg)


def call_json(
    api: Any,
    method: str,
    path: str,
    body: Any = None,
    *,
    content_type: str = "application/json",
    query: list[tuple[str, str]] | None = None,
    timeout: float | tuple[float, float] = DEFAULT_TIMEOUT,
) -> dict[str, Any]:
    """One request to `path` (e.g. /apis/ray.io/v1/namespaces/ns/rayjobs/x); the JSON answer as a dict.

    Errors are the client's own (`kubernetes.client.rest.ApiException` with `.status`; urllib3's errors when
    the server cannot be reached): each caller maps them to its own error type. An empty answer is {}.
    """
    resp = api.call_api(
        path,
        method,
        query_params=query or [],
        header_params={"Accept": "application/json", "Content-Type": content_type},
        body=body,
        auth_settings=["BearerToken"],
        _preload_content=False,
        _request_timeout=timeout,
    )
    return as_dict(resp)


def as_dict(response: Any) -> dict[str, Any]:
    """Decode a `_preload_content=False` response (or the (response, status, headers) tuple some calls give)."""
    raw = response[0] if isinstance(response, tuple) else response
    data = raw.data
    if not data:
        return {}
    decoded: dict[str, Any] = json.loads(data)
    return decoded


def error_message(exc: Any) -> str:
    """The API's own message of an ApiException (its Status body), else its reason; never a request body."""
    try:
        message = json.loads(exc.body).get("message")
    except (TypeError, ValueError, AttributeError):
        message = None
    return str(message or getattr(exc, "reason", "") or type(exc).__name__)


def error_reason(exc: Any) -> str:
    """The API's machine-readable reason of an ApiException (e.g. AlreadyExists), else its HTTP reason."""
    try:
        reason = json.loads(exc.body or "{}").get("reason")
    except (TypeError, ValueError, AttributeError):
        reason = None
    return str(reason or getattr(exc, "reason", "") or "")


def kubeconfig_from_env() -> Path | None:
    """The first file named by $KUBECONFIG, if set."""
    env = os.environ.get("KUBECONFIG")
    return Path(env.split(os.pathsep)[0]) if env else None
