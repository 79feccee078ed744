"""`kubetune logs --serving NAME` against the real API server and the dev kubelet (kubetune_cli.localenv.deployments,
the stand-in for kubelets, which keeps each pod's container logs in the state folder): a job served on a shared
multi-LoRA server (spec.deploy.server) gets the shared server's pods' logs, named as such; a job with its own
server gets its own Deployment's log; after a new pod template only the current pods are shown.

The pods run a short Python program in place of vLLM (what is tested is which Deployment's pods are found, not
vLLM: tests/operator/test_inference_shared_vllm.py runs the real server)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from kubetune_operator import names
from kubetune_operator.builders import shared_server as ss
from kubetune_operator.builders.inference import SERVER_CONTAINER
from kubetune_operator.meta import LABEL_JOB
from tests.support.k8s import install_finetunejob_crd
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

SERVER = "chat-pool"


def _job(name: str, server: str | None) -> dict[str, Any]:
    deploy: dict[str, Any] = {"server": server} if server else {}
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name},
        "spec": {
            "model": {"uri": "s3://kubetune-test/models/tiny"},
            "dataset": {"train": "s3://kubetune-test/data/train.jsonl", "format": "completion"},
            "output": {"uri": "s3://kubetune-test/runs"},
            "deploy": deploy,
        },
    }


def _deployment(name: str, labels: dict[str, str], replicas: int, says: str) -> dict[str, Any]:
    """A Deployment whose server container prints `says` and stays up (a pod of the kubelet stand-in)."""
    program = f"print({says!r}, flush=True); import signal; signal.pause()"  # up until stopped
    container = {"name": SERVER_CONTAINER, "image": "unused", "command": ["python3", "-c", program]}
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": labels},
            "template": {"metadata": {"labels": labels}, "spec": {"containers": [container]}},
        },
    }


def _pod_logs(state: Path, ns: str, deployment: str, says: str, count: int) -> list[Path]:
    logs = sorted((state / "serving" / ns / deployment).glob(f"*/{SERVER_CONTAINER}.log"))
    return [p for p in logs if says in p.read_text()] if len(logs) >= count else []


def _logs(monkeypatch: pytest.MonkeyPatch, kubeconfig: Path, capsys: Any, *args: str) -> tuple[int, str, str]:
    from kubetune_cli.main import main

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    capsys.readouterr()
    rc = main(["logs", "--serving", *args])
    out, err = capsys.readouterr()
    return rc, out, err


def test_logs_serving_finds_the_shared_server_or_the_own_deployment(
    control_plane: Any,
    kubeconfig: Path,
    k8s_client: Any,
    namespace: str,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    from kubernetes import client

    from kubetune_cli.localenv.deployments import LocalKubelet

    ns, state = namespace, tmp_path / "dev"
    custom, apps = client.CustomObjectsApi(k8s_client), client.AppsV1Api(k8s_client)
    install_finetunejob_crd(control_plane)
    for job in (_job("support-bot", SERVER), _job("solo-bot", None)):
        custom.create_namespaced_custom_object(api.GROUP, api.VERSION, ns, api.PLURAL, job)
    endpoint = {"endpoint": ss.endpoint(SERVER, ns, "support")}  # what the operator reports once it is served
    custom.patch_namespaced_custom_object_status(
        api.GROUP, api.VERSION, ns, api.PLURAL, "support-bot", {"status": endpoint}
    )

    # Nothing runs yet: the error names the shared server it looked for.
    rc, _, err = _logs(monkeypatch, kubeconfig, capsys, "support-bot", "-n", ns, "--dir", str(state))
    assert rc == 2 and f"no shared inference server {SERVER} log for {ns}/support-bot" in err, err

    apps.create_namespaced_deployment(ns, _deployment(SERVER, ss.server_labels(SERVER), 2, "pool v1 up"))
    own = names.inference("solo-bot")
    apps.create_namespaced_deployment(ns, _deployment(own, {LABEL_JOB: "solo-bot"}, 1, "solo up"))
    kubelet = LocalKubelet(kubeconfig, state, poll=0.5).start()
    try:
        pool = wait_for("both shared-server pods' logs", lambda: _pod_logs(state, ns, SERVER, "pool v1 up", 2), 120)
        wait_for("the own server's log", lambda: _pod_logs(state, ns, own, "solo up", 1), 120)

        rc, out, err = _logs(monkeypatch, kubeconfig, capsys, "support-bot", "-n", ns, "--dir", str(state))
        assert rc == 0, err
        assert out == "".join(f"==> pod {p.parent.name} <==\npool v1 up\n" for p in pool), out
        assert f"served as model support on the shared inference server {SERVER}" in err

        rc, out, err = _logs(monkeypatch, kubeconfig, capsys, "solo-bot", "-n", ns, "--dir", str(state))
        assert rc == 0 and out == "solo up\n" and "shared" not in err, (out, err)

        # A new pod template (one replica): the replaced pods' logs stay on disk, only the current pod's is shown.
        apps.replace_namespaced_deployment(SERVER, ns, _deployment(SERVER, ss.server_labels(SERVER), 1, "pool v2 up"))
        wait_for("the new shared-server pod's log", lambda: _pod_logs(state, ns, SERVER, "pool v2 up", 3), 120)
        assert all(p.is_file() for p in pool)  # the old pods' logs are still there to be picked wrongly
        rc, out, err = _logs(monkeypatch, kubeconfig, capsys, "support-bot", "-n", ns, "--dir", str(state))
        assert rc == 0 and out == "pool v2 up\n", (out, err)
    finally:
        kubelet.stop()
