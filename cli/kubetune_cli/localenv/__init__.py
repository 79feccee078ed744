"""Local environment for tests and `kubetune dev up`: a real kube-apiserver (+etcd, +controller-manager) and
a real S3 server (SeaweedFS), all on 127.0.0.1 free ports, all torn down by whoever started them.

Why here and not in tests/: the `kubetune dev up` command and the pytest fixtures must start the very same
environment, so that what the tests verify is what a developer runs. Names are loaded lazily (PEP 562) so
that importing one submodule does not pull in the Kubernetes client and boto3.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {
    "ControlPlane": "control_plane",
    "ControlPlaneError": "control_plane",
    "KubeRayCRDs": "control_plane",
    "install_crds": "control_plane",
    "install_kuberay_crds": "control_plane",
    "S3Server": "s3_server",
    "S3ServerError": "s3_server",
    "KubeBinaries": "binaries",
    "ToolNotFound": "binaries",
    "find_etcd": "binaries",
    "find_helm": "binaries",
    "find_kube_binaries": "binaries",
    "find_kubectl": "binaries",
}

__all__ = [
    "ControlPlane",
    "ControlPlaneError",
    "KubeBinaries",
    "KubeRayCRDs",
    "S3Server",
    "S3ServerError",
    "ToolNotFound",
    "find_etcd",
    "find_helm",
    "find_kube_binaries",
    "find_kubectl",
    "install_crds",
    "install_kuberay_crds",
]

if TYPE_CHECKING:
    from kubetune_cli.localenv.binaries import (
        KubeBinaries,
        ToolNotFound,
        find_etcd,
        find_helm,
        find_kube_binaries,
        find_kubectl,
    )
    from kubetune_cli.localenv.control_plane import (
        ControlPlane,
        ControlPlaneError,
        KubeRayCRDs,
        install_crds,
        install_kuberay_crds,
    )
    from kubetune_cli.localenv.s3_server import S3Server, S3ServerError


def __getattr__(name: str) -> Any:
    module = _EXPORTS.get(name)
    if module is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(f"{__name__}.{module}"), name)
