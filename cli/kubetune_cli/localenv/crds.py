"""Install CustomResourceDefinitions, including KubeRay's, into a (local v1.20) API server.

Why KubeRay's real CRDs: every RayJob the operator builds is then validated against KubeRay's own schema, so
a wrong field type fails in tests, not in a user's cluster. The local server is v1.20, which refuses three
things in them (CEL `x-kubernetes-validations`, empty-string/null defaults, list-map keys); we drop those.
The adapted CRDs (2 MB) are cached as one-line-JSON YAML documents: `kubectl create -f` still takes the file,
and reading it back is 10x faster than parsing YAML.

Why create/replace and not `kubectl apply`: client-side apply stores the whole object in the
last-applied-configuration annotation, which overflows the 256 KiB annotation limit for these CRDs.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune.kubeclient import api_client, as_dict
from kubetune_cli.localenv.binaries import cache_dir, shared_dir

log = logging.getLogger(__name__)

KUBERAY_FILES = ("ray.io_rayjobs.yaml", "ray.io_rayclusters.yaml")
_ADAPTER_VERSION = "1"  # bump when adapt_for_1_20 changes, to invalidate cached output


@dataclass(frozen=True)
class KubeRayCRDs:
    """What `install_kuberay_crds` installed (or found already installed in a real cluster: `source` None).

    `strict` is always True: KubeRay's own schema validates every RayJob (there is no permissive fallback).
    """

    names: tuple[str, ...]
    strict: bool
    source: Path | None


class KubeRayCRDsMissing(FileNotFoundError):
    """KubeRay's CRD files are not there, so RayJobs could not be validated against KubeRay's schema."""


def adapt_for_1_20(obj: Any) -> Any:
    """Drop what a v1.20 server refuses, in place: CEL rules, ""/null defaults, list-map keys (and type)."""
    if isinstance(obj, dict):
        obj.pop("x-kubernetes-validations", None)
        if "default" in obj and obj["default"] in ("", None):
            obj.pop("default")
        if "x-kubernetes-list-map-keys" in obj:
            obj.pop("x-kubernetes-list-map-keys")
            obj.pop("x-kubernetes-list-type", None)
        for value in obj.values():
            adapt_for_1_20(value)
    elif isinstance(obj, list):
        for value in obj:
            adapt_for_1_20(value)
    return obj


def load_documents(path: Path) -> list[dict[str, Any]]:
    """All non-empty YAML documents of a file (C loader when available)."""
    loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
    with open(path) as f:
        return [d for d in yaml.load_all(f, Loader=loader) if d]


def _write_json_docs(path: Path, docs: Sequence[dict[str, Any]]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    with os.fdopen(fd, "w") as f:
        f.write("\n---\n".join(json.dumps(d, separators=(",", ":")) for d in docs) + "\n")
    os.replace(tmp, path)


def _read_json_docs(path: Path) -> list[dict[str, Any]]:
    return [json.loads(part) for part in path.read_text().split("\n---\n") if part.strip()]


def adapted_kuberay_crds(kuberay_dir: Path) -> tuple[list[dict[str, Any]], Path]:
    """KubeRay's CRDs adapted for v1.20, from the cache when the sources are unchanged."""
    sources = [kuberay_dir / name for name in KUBERAY_FILES]
    digest = hashlib.sha256(_ADAPTER_VERSION.encode())
    for src in sources:
        digest.update(src.read_bytes())
    cache_root = cache_dir() / "kuberay"
    cache_root.mkdir(parents=True, exist_ok=True)
    cached = cache_root / f"kuberay-crds-1.20-{digest.hexdigest()[:16]}.yaml"
    if cached.is_file():
        try:
            return _read_json_docs(cached), cached
        except (OSError, ValueError):
            log.warning("cached %s is unreadable; adapting again", cached)
    docs = [adapt_for_1_20(d) for src in sources for d in load_documents(src)]
    _write_json_docs(cached, docs)
    return docs, cached


def _as_documents(items: Iterable[str | Path | dict[str, Any]]) -> list[dict[str, Any]]:
    docs: list[dict[str, Any]] = []
    for item in items:
        docs.extend([item] if isinstance(item, dict) else load_documents(Path(item)))
    return [d for d in docs if d.get("kind") == "CustomResourceDefinition"]


def install_crds(
    kubeconfig: str | Path,
    crds: Iterable[str | Path | dict[str, Any]],
    *,
    timeout: float = 60.0,
    replace: bool = True,
) -> list[str]:
    """Create (or, with `replace`, replace) CRDs from files and/or dicts; wait until each is Established and
    served. `replace=False` leaves a CRD that already exists untouched (e.g. a real cluster's own KubeRay).

    Returns the CRD names. Raises TimeoutError naming the CRD and its conditions when one does not settle.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    docs = _as_documents(crds)
    with api_client(kubeconfig) as api:
        ext = client.ApiextensionsV1Api(api)
        for doc in docs:
            name = doc["metadata"]["name"]
            try:
                ext.create_custom_resource_definition(doc, _preload_content=False, _request_timeout=timeout)
            except ApiException as e:
                if e.status != 409:
                    raise
                if not replace:
                    log.info("CRD %s exists; leaving it as it is", name)
                    continue
                current = as_dict(ext.read_custom_resource_definition(name, _preload_content=False))
                body = copy.deepcopy(doc)
                body["metadata"]["resourceVersion"] = current["metadata"]["resourceVersion"]
                ext.replace_custom_resource_definition(name, body, _preload_content=False, _request_timeout=timeout)
        deadline = time.monotonic() + timeout
        for doc in docs:
            _wait_served(api, doc, deadline)
    return [d["metadata"]["name"] for d in docs]


def _wait_served(api: Any, doc: dict[str, Any], deadline: float) -> None:
    """Wait until the storage version's list endpoint answers, then confirm Established.

    Polls the (cheap) custom-resource list rather than the CRD itself: a KubeRay CRD is ~1 MB of JSON per read,
    and re-reading it every 200 ms slows the server that is busy building its OpenAPI spec.
    """
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    custom = client.CustomObjectsApi(api)
    name = doc["metadata"]["name"]
    spec = doc["spec"]
    version = next(v["name"] for v in spec["versions"] if v.get("storage"))
    while True:
        try:
            custom.list_cluster_custom_object(
                spec["group"], version, spec["names"]["plural"], limit=1, _preload_content=False, _request_timeout=5
            )
            break
        except ApiException as e:
            if e.status != 404:
                raise
        if time.monotonic() >= deadline:
            break
        time.sleep(0.2)
    ext = client.ApiextensionsV1Api(api)
    while True:
        status = as_dict(ext.read_custom_resource_definition(name, _preload_content=False)).get("status", {})
        conditions = status.get("conditions") or []
        if any(c.get("type") == "Established" and c.get("status") == "True" for c in conditions):
            return
        if time.monotonic() >= deadline:
            raise TimeoutError(f"CRD {name} not established/served in time; conditions: {conditions}")
        time.sleep(0.5)


def install_kuberay_crds(
    kubeconfig: str | Path,
    *,
    kuberay_dir: Path | None = None,
    timeout: float = 120.0,
    replace: bool = True,
) -> KubeRayCRDs:
    """Install KubeRay's RayJob and RayCluster CRDs adapted for v1.20.

    Pass `replace=False` against a real cluster so that its own (newer, unadapted) KubeRay CRDs stay; there,
    CRDs already installed are enough. Without the files (and without them in the cluster) this raises
    KubeRayCRDsMissing: a permissive stand-in would let a wrong RayJob field pass every test.
    """
    if kuberay_dir is None:
        shared = shared_dir()
        kuberay_dir = shared / "kuberay" if shared else None
    if kuberay_dir is not None and all((kuberay_dir / n).is_file() for n in KUBERAY_FILES):
        docs, cached = adapted_kuberay_crds(kuberay_dir)
        names = install_crds(kubeconfig, docs, timeout=timeout, replace=replace)
        return KubeRayCRDs(tuple(names), strict=True, source=cached)
    if not replace:
        present = _installed_kuberay_crds(kubeconfig)
        if present:
            return KubeRayCRDs(present, strict=True, source=None)
    raise KubeRayCRDsMissing(
        f"KubeRay's CRDs ({', '.join(KUBERAY_FILES)}) are not in {kuberay_dir or 'the shared folder'}: set "
        "KUBETUNE_SHARED to the folder that holds kuberay/ (RayJobs must be validated against KubeRay's schema)"
    )


def _installed_kuberay_crds(kubeconfig: str | Path) -> tuple[str, ...]:
    """The KubeRay CRDs (rayjobs.ray.io, rayclusters.ray.io) a cluster already has; () if either is missing."""
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    names = ("rayjobs.ray.io", "rayclusters.ray.io")
    with api_client(kubeconfig) as api:
        ext = client.ApiextensionsV1Api(api)
        for name in names:
            try:
                ext.read_custom_resource_definition(name, _preload_content=False)
            except ApiException as e:
                if e.status == 404:
                    return ()
                raise
    return names
