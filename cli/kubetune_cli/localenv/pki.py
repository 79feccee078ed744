"""The local control plane's keys and certificates: its CA, kube-apiserver's serving certificate and the
service-account signing key, as files in one folder.

Built with the operator's certificate helpers (kubetune_operator.certs, the one implementation of a CA and the
certificates it signs), so the control plane and the admission webhook make their certificates the same way.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from kubetune_operator import certs

# The names clients inside and outside the cluster call kube-apiserver by.
APISERVER_HOSTS = ("127.0.0.1", "localhost", "kubernetes", "kubernetes.default")


@dataclass(frozen=True)
class ControlPlanePki:
    """The files kube-apiserver, kube-controller-manager and their clients are given."""

    ca_file: Path
    apiserver_cert: Path
    apiserver_key: Path
    sa_public_key: Path
    sa_private_key: Path


def write_pki(directory: Path) -> ControlPlanePki:
    """A fresh CA (its key stays in memory: nothing else is signed later), kube-apiserver's certificate and the
    service-account token key pair, in `directory`."""
    directory.mkdir(parents=True, exist_ok=True)
    out = ControlPlanePki(
        ca_file=directory / "ca.crt",
        apiserver_cert=directory / "apiserver.crt",
        apiserver_key=directory / "apiserver.key",
        sa_public_key=directory / "sa.pub",
        sa_private_key=directory / "sa.key",
    )
    ca = certs.new_ca("kubetune-local-ca")
    certs.write_signed(ca, out.ca_file)
    apiserver = certs.new_server_cert(ca, APISERVER_HOSTS, common_name="kube-apiserver")
    certs.write_signed(apiserver, out.apiserver_cert, out.apiserver_key)
    sa_key = certs.new_key()
    certs.write_public_key(sa_key, out.sa_public_key)
    certs.write_key(sa_key, out.sa_private_key)
    return out
