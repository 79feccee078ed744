"""Operator settings, read once from the environment (the Deployment's env, or a developer's shell).

Why env and not a config file: the operator image is configured by its Helm chart, and env vars are what a
chart sets most simply; every setting has a default that works for a local run. Default images are pinned by
tag, never `latest`, so that an operator release always starts the trainer it was tested with.

| variable                          | default                                   | meaning                                   |
|-----------------------------------|-------------------------------------------|-------------------------------------------|
| KUBETUNE_TRAINER_IMAGE            | ghcr.io/kubetune/kubetune-trainer:0.1.0   | trainer image when the job names none     |
| KUBETUNE_INFERENCE_IMAGE          | ghcr.io/kubetune/kubetune-inference:0.1.0 | inference image when the job names none   |
| KUBETUNE_RAY_VERSION              | 2.60.0                                    | rayClusterSpec.rayVersion                 |
| KUBETUNE_RAY_TTL_SECONDS          | 300                                       | RayJob ttlSecondsAfterFinished            |
| KUBETUNE_NAMESPACES               | (empty: all namespaces)                   | comma-separated namespaces to watch       |
| KUBETUNE_WEBHOOK                  | false                                     | serve the validating admission webhook    |
| KUBETUNE_WEBHOOK_ADDR             | 127.0.0.1                                 | address the webhook server binds          |
| KUBETUNE_WEBHOOK_HOST             | (the address)                             | host name or IP the API server calls      |
| KUBETUNE_WEBHOOK_PORT             | 9443                                      | webhook port                              |
| KUBETUNE_WEBHOOK_CERT_DIR         | (empty: generate a CA and certificate)    | tls.crt, tls.key, ca.crt to serve with    |
| KUBETUNE_WEBHOOK_CONFIG_NAME      | kubetune.io                               | ValidatingWebhookConfiguration kopf keeps |
| KUBETUNE_WEBHOOK_MANAGED          | true                                      | false: someone else (the Helm chart) owns |
|                                   |                                           | the ValidatingWebhookConfiguration        |
| KUBETUNE_METRICS_ADDR             | 127.0.0.1                                 | address of /metrics                       |
| KUBETUNE_METRICS_PORT             | 8080 (0 disables)                         | port of /metrics                          |
| KUBETUNE_HEALTH_ADDR              | 127.0.0.1                                 | address of kopf's /healthz                |
| KUBETUNE_HEALTH_PORT              | 8081 (0 disables)                         | port of kopf's /healthz liveness probe    |
| KUBETUNE_PEERING                  | (empty: standalone)                       | kopf peering name, for several replicas   |
| KUBETUNE_PEERING_PRIORITY         | (empty: from a hash of the host name)     | this replica's kopf peering priority      |
| KUBETUNE_PEERING_LIFETIME         | 20                                        | seconds a silent peer counts as alive     |
| KUBETUNE_MAX_WORKERS              | 16                                        | threads running (blocking) handlers       |
| KUBETUNE_ALLOWED_IMAGE_REGISTRIES | (empty: any)                              | comma-separated registries (or registry/  |
|                                   |                                           | path prefixes) a spec's images may use    |
| KUBETUNE_OPERATOR_NAMESPACE       | (empty: any)                              | namespace of this operator, admitted to   |
|                                   |                                           | Ray heads by their NetworkPolicy          |
| KUBETUNE_KUBERAY_NAMESPACE        | (empty: any)                              | namespace of KubeRay's operator, likewise |

Peering: kopf pauses every replica that sees a live peer of the same or a higher priority, so replicas that
all had priority 0 paused each other for good. Each replica takes its own priority (a hash of its pod name,
unique per pod); the highest live one works, the others stand by. A replica killed without saying goodbye
counts as alive for KUBETUNE_PEERING_LIFETIME seconds after its last keep-alive (kopf's default, 60 s, is too
long for a 30 s takeover); a replica stopped normally removes itself at once.
"""

from __future__ import annotations

import hashlib
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field

DEFAULT_TRAINER_IMAGE = "ghcr.io/kubetune/kubetune-trainer:0.1.0"
DEFAULT_INFERENCE_IMAGE = "ghcr.io/kubetune/kubetune-inference:0.1.0"
DEFAULT_RAY_VERSION = "2.60.0"


class SettingsError(ValueError):
    """An environment variable holds a value the operator cannot use; the message names it."""


@dataclass(frozen=True)
class Settings:
    trainer_image: str = DEFAULT_TRAINER_IMAGE
    inference_image: str = DEFAULT_INFERENCE_IMAGE
    ray_version: str = DEFAULT_RAY_VERSION
    ray_ttl_seconds: int = 300
    namespaces: tuple[str, ...] = field(default_factory=tuple)
    webhook: bool = False
    webhook_addr: str = "127.0.0.1"
    webhook_host: str | None = None
    webhook_port: int = 9443
    webhook_cert_dir: str | None = None
    webhook_config_name: str = "kubetune.io"
    webhook_managed: bool = True
    metrics_addr: str = "127.0.0.1"
    metrics_port: int = 8080
    health_addr: str = "127.0.0.1"
    health_port: int = 8081
    peering: str | None = None
    peering_priority: int = field(default_factory=lambda: default_priority())
    peering_lifetime: int = 20
    max_workers: int = 16
    allowed_image_registries: tuple[str, ...] = field(default_factory=tuple)
    operator_namespace: str | None = None
    kuberay_namespace: str | None = None

    @classmethod
    def from_env(cls, env: Mapping[str, str] | None = None) -> Settings:
        env = os.environ if env is None else env

        def text(var: str, default: str) -> str:
            return (env.get(var) or "").strip() or default

        def number(var: str, default: int, low: int, high: int) -> int:
            raw = (env.get(var) or "").strip()
            if not raw:
                return default
            try:
                value = int(raw)
            except ValueError:
                raise SettingsError(f"{var} must be an integer, got {raw!r}") from None
            if not low <= value <= high:
                raise SettingsError(f"{var} must be between {low} and {high}, got {value}")
            return value

        def flag(var: str, default: bool) -> bool:
            raw = (env.get(var) or "").strip().lower()
            if not raw:
                return default
            if raw in ("1", "true", "yes", "on"):
                return True
            if raw in ("0", "false", "no", "off"):
                return False
            raise SettingsError(f"{var} must be true or false, got {raw!r}")

        for var in ("KUBETUNE_TRAINER_IMAGE", "KUBETUNE_INFERENCE_IMAGE"):
            image = (env.get(var) or "").strip()
            if image and (":" not in image.rsplit("/", 1)[-1] and "@" not in image or image.endswith(":latest")):
                raise SettingsError(f"{var} must be pinned by tag or digest (not latest), got {image!r}")
        namespaces = tuple(n.strip() for n in (env.get("KUBETUNE_NAMESPACES") or "").split(",") if n.strip())
        registries = tuple(
            r.strip() for r in (env.get("KUBETUNE_ALLOWED_IMAGE_REGISTRIES") or "").split(",") if r.strip()
        )
        return cls(
            trainer_image=text("KUBETUNE_TRAINER_IMAGE", DEFAULT_TRAINER_IMAGE),
            inference_image=text("KUBETUNE_INFERENCE_IMAGE", DEFAULT_INFERENCE_IMAGE),
            ray_version=text("KUBETUNE_RAY_VERSION", DEFAULT_RAY_VERSION),
            ray_ttl_seconds=number("KUBETUNE_RAY_TTL_SECONDS", 300, 0, 2**31 - 1),
            namespaces=namespaces,
            webhook=flag("KUBETUNE_WEBHOOK", False),
            webhook_addr=text("KUBETUNE_WEBHOOK_ADDR", "127.0.0.1"),
            webhook_host=(env.get("KUBETUNE_WEBHOOK_HOST") or "").strip() or None,
            webhook_port=number("KUBETUNE_WEBHOOK_PORT", 9443, 1, 65535),
            webhook_cert_dir=(env.get("KUBETUNE_WEBHOOK_CERT_DIR") or "").strip() or None,
            webhook_config_name=text("KUBETUNE_WEBHOOK_CONFIG_NAME", "kubetune.io"),
            webhook_managed=flag("KUBETUNE_WEBHOOK_MANAGED", True),
            metrics_addr=text("KUBETUNE_METRICS_ADDR", "127.0.0.1"),
            metrics_port=number("KUBETUNE_METRICS_PORT", 8080, 0, 65535),
            health_addr=text("KUBETUNE_HEALTH_ADDR", "127.0.0.1"),
            peering=(env.get("KUBETUNE_PEERING") or "").strip() or None,
            health_port=number("KUBETUNE_HEALTH_PORT", 8081, 0, 65535),
            peering_priority=number("KUBETUNE_PEERING_PRIORITY", default_priority(), 1, 2**31 - 1),
            peering_lifetime=number("KUBETUNE_PEERING_LIFETIME", 20, 5, 3600),
            max_workers=number("KUBETUNE_MAX_WORKERS", 16, 1, 1024),
            allowed_image_registries=registries,
            operator_namespace=(env.get("KUBETUNE_OPERATOR_NAMESPACE") or "").strip() or None,
            kuberay_namespace=(env.get("KUBETUNE_KUBERAY_NAMESPACE") or "").strip() or None,
        )


def default_priority(host: str | None = None) -> int:
    """A peering priority of its own for this replica: a hash of its host (pod) name, in 1 .. 2**31-1."""
    digest = hashlib.sha256((host or socket.gethostname()).encode()).digest()
    return int.from_bytes(digest[:4], "big") % (2**31 - 1) + 1
