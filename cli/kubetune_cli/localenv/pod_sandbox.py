"""A pod template made runnable on this machine: the kubelet's share of the local runtime.

Development tool. A container's environment is resolved the way the kubelet resolves it (`value`, `valueFrom`
secretKeyRef / configMapKeyRef / fieldRef, `envFrom`, `$(VAR)` references), and its volumes are materialised
under a folder of the sandbox (ConfigMaps and Secrets as files, emptyDirs as folders). Containers here share
the host's file system, so a path below a mountPath (e.g. `/etc/kubetune/config.json`) is rewritten to the
folder that plays that volume, in the command, the arguments and the environment.

What is deliberately not emulated: images (the containers run from this machine's Python environments),
resources (informative only), probes other than HTTP readiness, and ports (callers choose free ones).
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, cast

Lookup = Callable[[str], Mapping[str, str] | None]  # object name -> its data (decoded), None if missing


class PodConfigError(RuntimeError):
    """What the kubelet reports as CreateContainerConfigError: a missing Secret, ConfigMap or key."""


class PodSandbox:
    """One pod's volumes and environment on the host."""

    def __init__(
        self,
        root: Path,
        pod_spec: Mapping[str, Any],
        *,
        namespace: str,
        pod_name: str,
        config_maps: Lookup,
        secrets: Lookup,
    ) -> None:
        self.root = root
        self.spec = pod_spec
        self.namespace = namespace
        self.pod_name = pod_name
        self._config_maps = config_maps
        self._secrets = secrets
        self.volumes: dict[str, Path] = {}

    # ---------------------------------------------------------------------------------------- volumes

    def materialise(self) -> None:
        """Write every volume this pod declares under `root/volumes/<name>` (idempotent, refreshes files)."""
        for vol in self.spec.get("volumes") or []:
            path = self.root / "volumes" / vol["name"]
            path.mkdir(parents=True, exist_ok=True)
            if "configMap" in vol:
                self._write_items(path, vol["configMap"], self._config_maps, "ConfigMap", 0o644)
            elif "secret" in vol:
                src = dict(vol["secret"], name=vol["secret"].get("secretName"))
                self._write_items(path, src, self._secrets, "Secret", 0o600)
            self.volumes[vol["name"]] = path

    def _write_items(self, path: Path, src: Mapping[str, Any], lookup: Lookup, kind: str, mode: int) -> None:
        data = lookup(src["name"])
        if data is None:
            if src.get("optional"):
                return
            raise PodConfigError(f'{kind.lower()} "{src["name"]}" not found')
        items = src.get("items") or [{"key": k, "path": k} for k in data]
        for item in items:
            if item["key"] not in data:
                raise PodConfigError(f'{kind} "{src["name"]}" has no key "{item["key"]}"')
            target = path / item["path"]
            target.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, mode)
            with os.fdopen(fd, "w") as f:
                f.write(data[item["key"]])

    def mounts(self, container: Mapping[str, Any]) -> list[tuple[str, Path]]:
        """(mountPath, local folder) of the container, longest mountPath first (for prefix rewriting)."""
        out = []
        for m in container.get("volumeMounts") or []:
            if m["name"] in self.volumes:
                local = self.volumes[m["name"]] / m["subPath"] if m.get("subPath") else self.volumes[m["name"]]
                out.append((m["mountPath"].rstrip("/") or "/", local))
        return sorted(out, key=lambda x: -len(x[0]))

    def localize(self, text: str, container: Mapping[str, Any]) -> str:
        """Rewrite paths below the container's mountPaths to the local folders that play the volumes."""
        for mount_path, local in self.mounts(container):
            if mount_path in ("/dev/shm", "/tmp"):
                continue  # the host's own are fine
            pattern = r"(?<![\w/.-])" + re.escape(mount_path) + r"""(?=[/\s"':,;]|$)"""
            text = re.sub(pattern, str(local).replace("\\", "\\\\"), text)
        return text

    # -------------------------------------------------------------------------------------------- env

    def env(self, container: Mapping[str, Any]) -> dict[str, str]:
        """The container's environment variables (not the host's), resolved like the kubelet does."""
        env: dict[str, str] = {}
        for src in container.get("envFrom") or []:
            prefix = src.get("prefix", "")
            ref, lookup = (
                (src["secretRef"], self._secrets) if "secretRef" in src else (src["configMapRef"], self._config_maps)
            )
            data = lookup(ref["name"])
            if data is None:
                if ref.get("optional"):
                    continue
                raise PodConfigError(f'envFrom: "{ref["name"]}" not found')
            env.update({prefix + k: v for k, v in data.items()})
        for var in container.get("env") or []:
            value = self._env_value(var, env)
            if value is not None:
                env[var["name"]] = self.localize(value, container)
        return env

    def _env_value(self, var: Mapping[str, Any], so_far: Mapping[str, str]) -> str | None:
        if "value" in var:
            return expand(var["value"], so_far)
        src = var.get("valueFrom") or {}
        for key, lookup, kind in (
            ("secretKeyRef", self._secrets, "secret"),
            ("configMapKeyRef", self._config_maps, "configmap"),
        ):
            if key in src:
                ref = src[key]
                data = lookup(ref["name"])
                if data is None or ref["key"] not in data:
                    if ref.get("optional"):
                        return None
                    what = (
                        f'{kind} "{ref["name"]}"' if data is None else f'key "{ref["key"]}" in {kind} "{ref["name"]}"'
                    )
                    raise PodConfigError(f"{what} not found (env {var['name']})")
                return data[ref["key"]]
        if "fieldRef" in src:
            field = src["fieldRef"].get("fieldPath")
            return {
                "metadata.name": self.pod_name,
                "metadata.namespace": self.namespace,
                "status.podIP": "127.0.0.1",
                "status.hostIP": "127.0.0.1",
                "spec.nodeName": "localhost",
                "spec.serviceAccountName": cast(str, self.spec.get("serviceAccountName", "default")),
            }.get(field, "")
        return ""

    def argv(self, container: Mapping[str, Any], env: Mapping[str, str]) -> list[str]:
        """command + args with $(VAR) references expanded and mount paths localised."""
        parts = [*(container.get("command") or []), *(container.get("args") or [])]
        return [self.localize(expand(p, env), container) for p in parts]


_REF = re.compile(r"\$\$|\$\(([A-Za-z_][A-Za-z0-9_]*)\)")


def expand(text: str, env: Mapping[str, str]) -> str:
    """Kubernetes' $(VAR) expansion: known variables are replaced, unknown ones kept, $$ escapes."""

    def sub(m: re.Match[str]) -> str:
        if m.group(0) == "$$":
            return "$"
        return env.get(m.group(1), m.group(0))

    return _REF.sub(sub, text)
