"""A real Kubernetes control plane on loopback: etcd + kube-apiserver (+ kube-controller-manager).

Why real servers and not a fake client: the operator's contract is with the API server (CRD schema
validation and pruning, RBAC, status subresource, ownerReference garbage collection), and only a real one
tests that. v1.20.2 is what these machines can run (see DESIGN.md). Set-up mirrors
`shared/envtest/up.sh`: token auth (admin in system:masters), RBAC, service-account signing keys.

Extra identities for RBAC tests: static token users passed at construction (`users=`), because the token
file is read once at start; and ServiceAccounts at any time via `kubeconfig_for_service_account`, whose
tokens the controller-manager's `serviceaccount-token` controller mints (that controller has to be named in
`--controllers` explicitly: `serviceaccount` alone only creates the ServiceAccounts).
"""

from __future__ import annotations

import atexit
import base64
import contextlib
import logging
import os
import secrets
import shutil
import ssl
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kubetune_cli.localenv import pki
from kubetune_cli.localenv.binaries import KubeBinaries, find_kube_binaries
from kubetune_cli.localenv.crds import KubeRayCRDs, install_crds, install_kuberay_crds
from kubetune_cli.localenv.kubeclient import api_client, as_dict, current_cluster, load_kubeconfig, write_kubeconfig
from kubetune_cli.localenv.processes import ManagedProcess, ProcessExited, free_ports, make_workdir, wait_until

__all__ = ["ControlPlane", "ControlPlaneError", "KubeRayCRDs", "install_crds", "install_kuberay_crds"]

log = logging.getLogger(__name__)

KCM_CONTROLLERS = ("garbagecollector", "namespace", "serviceaccount", "serviceaccount-token")
EXISTING_CLUSTER_ENV = "KUBETUNE_TEST_EXISTING_CLUSTER"
_START_ATTEMPTS = 3  # a free port can be taken between choosing it and binding it


class ControlPlaneError(RuntimeError):
    """The control plane did not come up (the message carries the servers' last log lines)."""


class ControlPlane:
    """etcd + kube-apiserver (+ kube-controller-manager) on free 127.0.0.1 ports; a context manager.

    `workdir=None` uses a temp directory that `stop()` removes; a given `workdir` is kept. Attributes after
    `start()`: `kubeconfig` (admin, system:masters), `server`, `ca_file`, `token`.
    """

    def __init__(
        self,
        workdir: str | Path | None = None,
        *,
        controller_manager: bool = True,
        binaries: KubeBinaries | None = None,
        users: Mapping[str, Sequence[str]] | None = None,
        extra_apiserver_args: Sequence[str] = (),
        timeout: float = 120.0,
    ) -> None:
        self._given_workdir = Path(workdir) if workdir is not None else None
        self.controller_manager = controller_manager
        self._binaries = binaries
        self._users = {name: tuple(groups) for name, groups in (users or {}).items()}
        self._extra_apiserver_args = list(extra_apiserver_args)
        self.timeout = timeout
        self._external = False
        self._procs: list[ManagedProcess] = []
        self._tokens: dict[str, str] = {}
        self._tmp_owned: Path | None = None
        self._lock = threading.Lock()
        self.workdir: Path | None = None
        self.kubeconfig: Path | None = None
        self.server: str | None = None
        self.ca_file: Path | None = None
        self.token: str | None = None
        self.startup_seconds: float | None = None
        self.kuberay: KubeRayCRDs | None = None  # set by install_kuberay_crds()

    # --- existing clusters ----------------------------------------------------------------------------

    @classmethod
    def attach(cls, kubeconfig: str | Path) -> ControlPlane:
        """Wrap an existing cluster's kubeconfig: start()/stop() then leave the cluster alone."""
        cp = cls(controller_manager=False)
        cp._external = True
        cp.kubeconfig = Path(kubeconfig)
        _, cluster = current_cluster(load_kubeconfig(kubeconfig))
        cp.server = cluster.get("server")
        cp._tmp_owned = make_workdir("kubetune-existing-")
        cp.workdir = cp._tmp_owned
        if "certificate-authority-data" in cluster:
            cp.ca_file = cp.workdir / "ca.crt"
            cp.ca_file.write_bytes(base64.b64decode(cluster["certificate-authority-data"]))
        elif "certificate-authority" in cluster:
            cp.ca_file = Path(cluster["certificate-authority"])
        _track(cp)
        return cp

    @classmethod
    def from_existing(cls) -> ControlPlane | None:
        """The cluster `$KUBECONFIG` names when `KUBETUNE_TEST_EXISTING_CLUSTER=1`; None otherwise.

        Typical use: `cp = ControlPlane.from_existing() or ControlPlane()`.
        """
        kubeconfig = os.environ.get("KUBECONFIG")
        if os.environ.get(EXISTING_CLUSTER_ENV) == "1" and kubeconfig:
            first = kubeconfig.split(os.pathsep)[0]
            log.info("using the existing cluster from KUBECONFIG=%s", first)
            return cls.attach(first)
        return None

    @property
    def external(self) -> bool:
        return self._external

    # --- lifecycle ------------------------------------------------------------------------------------

    def __enter__(self) -> ControlPlane:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> ControlPlane:
        """Start the servers and wait until /readyz answers (and the controller-manager is working)."""
        if self._external or self._procs:
            return self
        t0 = time.monotonic()
        binaries = self._binaries or find_kube_binaries()
        if self._given_workdir is not None:
            self.workdir = self._given_workdir
            self.workdir.mkdir(parents=True, exist_ok=True)
        else:
            self._tmp_owned = make_workdir("kubetune-cp-")
            self.workdir = self._tmp_owned
        _track(self)
        try:
            self._write_pki()
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    self._start_servers(binaries)
                    break
                except ControlPlaneError as e:
                    self._stop_procs()
                    if "address already in use" not in str(e) or attempt == _START_ATTEMPTS:
                        raise
                    log.warning("port clash while starting the control plane; retrying (%s)", attempt)
            if self.controller_manager:
                self._start_controller_manager(binaries)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("control plane ready at %s in %.1f s", self.server, self.startup_seconds)
        return self

    def stop(self) -> None:
        """Kill every server (whole process groups) and remove the temp workdir. Idempotent."""
        with self._lock:
            self._stop_procs()
            if self._tmp_owned is not None:
                shutil.rmtree(self._tmp_owned, ignore_errors=True)
                self._tmp_owned = None
        _untrack(self)

    def _stop_procs(self) -> None:
        for proc in reversed(self._procs):
            proc.stop()
        self._procs.clear()

    # --- internals ------------------------------------------------------------------------------------

    @property
    def _pki_dir(self) -> Path:
        assert self.workdir is not None
        return self.workdir / "pki"

    def _write_pki(self) -> None:
        d = self._pki_dir
        self.ca_file = pki.write_pki(d).ca_file  # and apiserver.crt/.key, sa.pub/.key: the names used below
        self.token = secrets.token_hex(16)
        self._tokens = {"admin": self.token, **{u: secrets.token_hex(16) for u in self._users}}
        lines = [f"{self.token},admin,admin,system:masters"]
        for i, (user, groups) in enumerate(self._users.items()):
            group_field = f',"{",".join(groups)}"' if groups else ""
            lines.append(f"{self._tokens[user]},{user},uid-{i}-{user}{group_field}")
        tokens = d / "tokens.csv"
        tokens.write_text("\n".join(lines) + "\n")
        tokens.chmod(0o600)

    def _spawn(self, name: str, argv: list[str]) -> ManagedProcess:
        assert self.workdir is not None
        proc = ManagedProcess(name, argv, self.workdir / f"{name}.log", cwd=self.workdir)
        self._procs.append(proc)
        return proc

    def _start_servers(self, b: KubeBinaries) -> None:
        assert self.workdir is not None
        etcd_port, peer_port, api_port = free_ports(3)
        etcd_dir = self.workdir / "etcd"
        shutil.rmtree(etcd_dir, ignore_errors=True)
        etcd_url, peer_url = f"http://127.0.0.1:{etcd_port}", f"http://127.0.0.1:{peer_port}"
        etcd = self._spawn(
            "etcd",
            [
                str(b.etcd),
                "--name=kubetune",
                f"--data-dir={etcd_dir}",
                f"--listen-client-urls={etcd_url}",
                f"--advertise-client-urls={etcd_url}",
                f"--listen-peer-urls={peer_url}",
                f"--initial-advertise-peer-urls={peer_url}",
                f"--initial-cluster=kubetune={peer_url}",
                "--unsafe-no-fsync",
                "--log-level=warn",
            ],
        )
        p = self._pki_dir
        apiserver = self._spawn(
            "kube-apiserver",
            [
                str(b.kube_apiserver),
                f"--etcd-servers={etcd_url}",
                "--bind-address=127.0.0.1",
                "--advertise-address=127.0.0.1",
                f"--secure-port={api_port}",
                f"--cert-dir={self.workdir / 'certs'}",
                f"--tls-cert-file={p / 'apiserver.crt'}",
                f"--tls-private-key-file={p / 'apiserver.key'}",
                f"--client-ca-file={p / 'ca.crt'}",
                f"--token-auth-file={p / 'tokens.csv'}",
                "--authorization-mode=RBAC",
                f"--service-account-key-file={p / 'sa.pub'}",
                f"--service-account-signing-key-file={p / 'sa.key'}",
                "--service-account-issuer=https://kubernetes.default.svc",
                "--service-cluster-ip-range=10.0.0.0/24",
                "--disable-admission-plugins=ServiceAccount",
                "--allow-privileged=true",
                "--profiling=false",
                *self._extra_apiserver_args,
            ],
        )
        self.server = f"https://127.0.0.1:{api_port}"
        try:
            ok = wait_until(self._ready, self.timeout, procs=[etcd, apiserver], interval=0.25)
        except ProcessExited as e:
            raise ControlPlaneError(f"control plane failed to start: {e}\n{self._logs()}") from None
        if not ok:
            raise ControlPlaneError(f"kube-apiserver not ready after {self.timeout:.0f} s\n{self._logs()}")
        self.kubeconfig = write_kubeconfig(
            self.workdir / "kubeconfig",
            server=self.server,
            token=self._tokens["admin"],
            ca_data_b64=base64.b64encode((p / "ca.crt").read_bytes()).decode(),
            user="admin",
        )

    def _ready(self) -> bool:
        return self._get_ok("/readyz")

    def restart_apiserver(self, down_seconds: float = 0.0) -> float:
        """Stop kube-apiserver and start it again with the same flags and port (etcd keeps every object), as a
        rolling control-plane upgrade does; for fault tests. Returns the seconds until /readyz answered."""
        if self._external:
            raise ControlPlaneError("cannot restart the API server of an existing cluster")
        old = next(p for p in self._procs if p.name == "kube-apiserver")
        old.stop()
        self._procs.remove(old)
        time.sleep(down_seconds)
        t0 = time.monotonic()
        new = self._spawn("kube-apiserver", old.argv)
        etcd = next(p for p in self._procs if p.name == "etcd")
        if not wait_until(self._ready, self.timeout, procs=[etcd, new], interval=0.25):
            raise ControlPlaneError(f"kube-apiserver not ready after a restart\n{self._logs()}")
        return time.monotonic() - t0

    def _get_ok(self, path: str) -> bool:
        """GET `path` as admin with a short timeout; True on HTTP 200 (no client library: it may not be up)."""
        assert self.server and self.ca_file
        ctx = ssl.create_default_context(cafile=str(self.ca_file))
        req = urllib.request.Request(f"{self.server}{path}", headers={"Authorization": f"Bearer {self.token}"})
        try:
            with urllib.request.urlopen(req, context=ctx, timeout=2) as resp:
                return bool(resp.status == 200)
        except (urllib.error.URLError, OSError):
            return False

    def _start_controller_manager(self, b: KubeBinaries) -> None:
        p = self._pki_dir
        kcm = self._spawn(
            "kube-controller-manager",
            [
                str(b.kube_controller_manager),
                f"--kubeconfig={self.kubeconfig}",
                "--leader-elect=false",
                "--port=0",
                "--secure-port=0",
                f"--controllers={','.join(KCM_CONTROLLERS)}",
                f"--service-account-private-key-file={p / 'sa.key'}",
                f"--root-ca-file={p / 'ca.crt'}",
            ],
        )
        # The serviceaccount controller creating default/default proves the controller-manager is working.
        try:
            ok = wait_until(self._default_sa_exists, self.timeout, procs=[kcm], interval=0.25)
        except ProcessExited as e:
            raise ControlPlaneError(f"kube-controller-manager failed: {e}") from None
        if not ok:
            raise ControlPlaneError(
                f"kube-controller-manager made no default ServiceAccount in {self.timeout:.0f} s\n{self._logs()}"
            )

    def _default_sa_exists(self) -> bool:
        return self._get_ok("/api/v1/namespaces/default/serviceaccounts/default")

    def _logs(self) -> str:
        return "\n".join(f"--- {p.name} ({p.log_path}) ---\n{p.log_tail()}" for p in self._procs)

    # --- clients and identities -------------------------------------------------------------------------

    def api_client(self) -> Any:
        """A `kubernetes.client.ApiClient` as admin (close it, or use it as a context manager)."""
        if self.kubeconfig is None:
            raise ControlPlaneError("control plane not started")
        return api_client(self.kubeconfig)

    def _ca_data_b64(self) -> str | None:
        return base64.b64encode(self.ca_file.read_bytes()).decode() if self.ca_file else None

    def kubeconfig_for_user(self, name: str, namespace: str = "default") -> Path:
        """Kubeconfig for a static token user given in `users=` at construction."""
        if name not in self._tokens or self.server is None or self.workdir is None:
            raise KeyError(f"unknown user {name!r}: pass users={{{name!r}: [groups]}} to ControlPlane()")
        return write_kubeconfig(
            self.workdir / "kubeconfigs" / f"user-{name}",
            server=self.server,
            token=self._tokens[name],
            ca_data_b64=self._ca_data_b64(),
            user=name,
            namespace=namespace,
        )

    def kubeconfig_for_service_account(
        self, namespace: str, name: str, *, create: bool = True, timeout: float = 60.0
    ) -> Path:
        """Kubeconfig authenticating as ServiceAccount `namespace/name` (created if missing and `create`).

        Waits for the token Secret the token controller makes for the ServiceAccount (v1.20); on clusters
        that no longer auto-create those (>= 1.24) it creates an annotated token Secret and waits for the
        controller to fill it, which works on both.
        """
        from kubernetes import client
        from kubernetes.client.rest import ApiException

        if self.server is None or self.workdir is None:
            raise ControlPlaneError("control plane not started")
        with self.api_client() as api:
            core = client.CoreV1Api(api)
            if create:
                with contextlib.suppress(ApiException):  # 409: exists already
                    core.create_namespaced_service_account(
                        namespace, {"metadata": {"name": name}}, _preload_content=False
                    )
            token = _wait_for_sa_token(core, namespace, name, timeout)
        return write_kubeconfig(
            self.workdir / "kubeconfigs" / f"sa-{namespace}-{name}",
            server=self.server,
            token=token,
            ca_data_b64=self._ca_data_b64(),
            user=f"system:serviceaccount:{namespace}:{name}",
            namespace=namespace,
        )

    def install_kuberay_crds(self, timeout: float = 120.0) -> KubeRayCRDs:
        """KubeRay CRDs adapted for v1.20; on an attached cluster, existing KubeRay CRDs are kept."""
        assert self.kubeconfig is not None
        self.kuberay = install_kuberay_crds(self.kubeconfig, timeout=timeout, replace=not self._external)
        return self.kuberay

    def install_crds(self, crds: Sequence[str | Path | dict[str, Any]], timeout: float = 60.0) -> list[str]:
        assert self.kubeconfig is not None
        return install_crds(self.kubeconfig, crds, timeout=timeout)


def _wait_for_sa_token(core: Any, namespace: str, name: str, timeout: float) -> str:
    from kubernetes.client.rest import ApiException

    deadline = time.monotonic() + timeout
    fallback_at = time.monotonic() + min(5.0, timeout / 2)
    own_secret = f"{name}-token-kubetune"
    created_own = False
    while time.monotonic() < deadline:
        try:
            sa = as_dict(core.read_namespaced_service_account(name, namespace, _preload_content=False))
        except ApiException as e:
            if e.status != 404:
                raise
            sa = {}
        candidates = [s["name"] for s in sa.get("secrets") or []] + ([own_secret] if created_own else [])
        for secret_name in candidates:
            try:
                secret = as_dict(core.read_namespaced_secret(secret_name, namespace, _preload_content=False))
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            token = (secret.get("data") or {}).get("token")
            if secret.get("type") == "kubernetes.io/service-account-token" and token:
                return base64.b64decode(token).decode()
        if sa and not created_own and time.monotonic() >= fallback_at:
            with contextlib.suppress(ApiException):
                core.create_namespaced_secret(
                    namespace,
                    {
                        "metadata": {"name": own_secret, "annotations": {"kubernetes.io/service-account.name": name}},
                        "type": "kubernetes.io/service-account-token",
                    },
                    _preload_content=False,
                )
            created_own = True
        time.sleep(0.2)
    raise TimeoutError(
        f"no token Secret for ServiceAccount {namespace}/{name} within {timeout:.0f} s "
        "(is kube-controller-manager running with the serviceaccount-token controller?)"
    )


# Control planes started in this process, stopped at exit if their owner did not (temp dirs included).
_instances: set[ControlPlane] = set()


def _track(cp: ControlPlane) -> None:
    _instances.add(cp)


def _untrack(cp: ControlPlane) -> None:
    _instances.discard(cp)


@atexit.register
def _stop_all() -> None:
    for cp in list(_instances):
        with contextlib.suppress(Exception):
            cp.stop()
