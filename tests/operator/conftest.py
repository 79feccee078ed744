"""Fixtures for the operator's integration tests: the FineTuneJob CRD, kubectl, KubeRay's part, and the
operator itself running in-process (with or without its admission webhook) against the session's real
kube-apiserver + etcd + kube-controller-manager (from tests/conftest.py).

Only one in-process operator runs at a time (module scope): two would both reconcile every job.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_support import ROOT, Kubectl, free_port, load_example, put_s3_secret, wait_for


@pytest.fixture
def namespace(namespace: str, kube: Any) -> str:
    """The session's fresh namespace, with the credentials Secrets the examples name (`s3-credentials`, ...):
    without it the operator holds a job back (Blocked, SecretNotFound). Tests that check for leaks write
    their own values into it (`put_s3_secret`)."""
    secret_names = {
        ((load_example(p.stem).get("spec") or {}).get("dataset") or {}).get("credentialsSecret")
        for p in (ROOT / "examples").glob("*.yaml")
    }
    for name in sorted(n for n in secret_names if n):
        put_s3_secret(kube, namespace, "AKIAKUBETUNETEST0000", "kubetune-default-test-secret", name=name)
    return namespace


@pytest.fixture(scope="session")
def ftj_crd(control_plane: Any) -> str:
    """The FineTuneJob CRD from crds/ (exactly as users apply it), established."""
    (name,) = control_plane.install_crds([ROOT / "crds" / "finetunejob.yaml"])
    return name


@pytest.fixture(scope="session")
def kubectl(kubeconfig: Path) -> Kubectl:
    from kubetune_cli.localenv.binaries import find_kubectl

    return Kubectl(str(find_kubectl()), kubeconfig)


@pytest.fixture(scope="session")
def kuberay(kubeconfig: Path, control_plane: Any) -> Iterator[Any]:
    """Plays KubeRay's RayJob controller (kubetune_cli.localenv.kuberay)."""
    from kubetune_cli.localenv.kuberay import KubeRay

    with KubeRay(kubeconfig) as kr:
        yield kr


@pytest.fixture(scope="session")
def kube(kubeconfig: Path) -> Iterator[Any]:
    """A JSON client for reading objects back (the operator's own, as admin)."""
    from kubetune_operator.kube import Kube, load_configuration

    k = Kube(load_configuration(kubeconfig))
    yield k
    k.close()


class InProcessOperator:
    """`kubetune_operator.runner.run` in a thread with its own event loop; start() waits until kopf is ready."""

    def __init__(self, kubeconfig: Path, settings: Any):
        self.kubeconfig = kubeconfig
        self.settings = settings
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None
        self._stop = threading.Event()

    def start(self, timeout: float = 90) -> InProcessOperator:
        from kubetune_operator import runner

        ready = threading.Event()
        self._stop = threading.Event()

        def main() -> None:
            try:
                asyncio.run(
                    runner.run(self.settings, kubeconfig=self.kubeconfig, stop_flag=self._stop, ready_flag=ready)
                )
            except BaseException as e:  # noqa: BLE001 - surfaced by start()/stop()
                self.error = e

        self._thread = threading.Thread(target=main, name="kubetune-operator", daemon=True)
        self._thread.start()
        if not ready.wait(timeout):
            self.stop()
            raise AssertionError(f"operator not ready within {timeout} s (error: {self.error!r})")
        return self

    def stop(self, timeout: float = 60) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "operator did not stop"
        if self.error is not None:
            raise AssertionError(f"operator crashed: {self.error!r}") from self.error


def _operator(kubeconfig: Path, **settings: Any) -> InProcessOperator:
    from kubetune_operator.settings import Settings

    return InProcessOperator(kubeconfig, Settings(metrics_port=0, health_port=0, **settings))


@pytest.fixture(scope="module")
def operator(kubeconfig: Path, ftj_crd: str) -> Iterator[InProcessOperator]:
    """The operator without its webhook: cross-field errors surface as conditions and Events."""
    op = _operator(kubeconfig).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def operator_with_webhook(kubeconfig: Path, ftj_crd: str, kubectl: Kubectl) -> Iterator[InProcessOperator]:
    """The operator serving its validating webhook on 127.0.0.1 (kopf manages the configuration)."""
    op = _operator(kubeconfig, webhook=True, webhook_port=free_port(), webhook_config_name="kubetune.io-test").start()
    bad = load_example("lora-chat")
    bad["spec"]["training"]["method"] = "full"  # valid for the schema, refused by the webhook only

    def refused_by_webhook() -> bool:
        # The API server picks up webhook configurations asynchronously: wait until it really calls ours.
        proc = kubectl.run(
            "apply", "--dry-run=server", "-n", "default", "-f", "-", input=yaml.safe_dump(bad), check=False
        )
        return proc.returncode != 0 and "denied the request" in proc.stderr

    wait_for("the admission webhook to be called", refused_by_webhook, timeout=60, interval=0.5)
    yield op
    op.stop()
