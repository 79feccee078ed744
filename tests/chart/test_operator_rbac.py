"""The operator, run in-process with the chart's ServiceAccount credentials against the real API server (RBAC
on), configured from the chart's own Deployment env: RBAC is enough (the GitOps example jobs reconcile to
RayJobs and follow them to success, with no 403 anywhere) and no more (requests outside the rules are
forbidden); re-applying the examples after they settled changes nothing; /metrics shows the job counts move.

The test plays KubeRay by writing RayJob status the way KubeRay does.
"""

from __future__ import annotations

import asyncio
import json
import logging
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, ROOT, one, run

from kubetune_operator import names, runner
from kubetune_operator.settings import Settings
from tests.support.waiting import free_port as _free_port
from tests.support.waiting import wait_for

pytestmark = pytest.mark.integration

EXAMPLES = ROOT / "examples" / "gitops" / "fine-tunes"
JOBS = ("support-chat-lora", "ticket-classifier")


def _wait(what: str, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.3) -> Any:
    return wait_for(what, fn, timeout, interval)


class LogCapture(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)

    def matching(self, *needles: str) -> list[str]:
        out = []
        for r in self.records:
            text = r.getMessage()
            if any(n in text for n in needles):
                out.append(f"{r.name} {r.levelname}: {text[:300]}")
        return out


class OperatorThread:
    """`kubetune_operator.runner.run` in a thread of this process, stopped through kopf's stop flag."""

    def __init__(self, settings: Settings, kubeconfig: Path) -> None:
        self.settings, self.kubeconfig = settings, kubeconfig
        self.stop_flag, self.ready_flag = threading.Event(), threading.Event()
        self.error: BaseException | None = None
        self.thread = threading.Thread(target=self._main, name="kubetune-operator", daemon=True)

    def _main(self) -> None:
        try:
            asyncio.run(
                runner.run(
                    self.settings, kubeconfig=self.kubeconfig, stop_flag=self.stop_flag, ready_flag=self.ready_flag
                )
            )
        except BaseException as e:  # noqa: BLE001 - reported by the test
            self.error = e

    def start(self, timeout: float = 60.0) -> None:
        self.thread.start()
        if not self.ready_flag.wait(timeout):
            raise AssertionError(f"operator not ready in {timeout} s (error: {self.error!r})")

    def stop(self, timeout: float = 60.0) -> None:
        self.stop_flag.set()
        self.thread.join(timeout)
        assert not self.thread.is_alive(), "operator did not stop"


def _chart_env(render, namespace: str, release: str, values: dict[str, Any]) -> dict[str, str]:
    """The operator container's env as the chart renders it, with the pod IP resolved to loopback."""
    deploy = one(render(values, namespace=namespace, release=release), "Deployment")
    env: dict[str, str] = {}
    for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]:
        value = "127.0.0.1" if e["name"] == "POD_IP" else e.get("value", "")
        env[e["name"]] = value.replace("$(POD_IP)", env.get("POD_IP", "127.0.0.1"))
    return env


class Kubectl:
    def __init__(self, kubectl: Path, kubeconfig: Path, namespace: str) -> None:
        self.base = [kubectl, "--kubeconfig", kubeconfig, "-n", namespace]

    def __call__(self, *args: str, input: str | None = None, check: bool = True) -> Any:
        result = run([*self.base, *args], input=input)
        if check:
            assert result.returncode == 0, f"kubectl {' '.join(args)}: {result.stderr}"
        return result

    def get(self, kind: str, name: str) -> dict[str, Any] | None:
        result = self("get", kind, name, "-o", "json", check=False)
        if result.returncode != 0:
            assert "NotFound" in result.stderr, result.stderr
            return None
        return json.loads(result.stdout)


def _example_jobs(namespace: str) -> str:
    """The GitOps example's FineTuneJobs (kustomize output), moved into the test's namespace."""
    docs = []
    for name in JOBS:
        doc = yaml.safe_load((EXAMPLES / "jobs" / f"{name}.yaml").read_text())
        doc["metadata"]["namespace"] = namespace
        docs.append(doc)
    return yaml.safe_dump_all(docs, sort_keys=False)


def _scrape(port: int) -> str:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        return resp.read().decode()


def _sample(text: str, name: str, **labels: str) -> float | None:
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in text.splitlines():
        if line.startswith(name + "{") or line.startswith(name + " "):
            metric, _, value = line.rpartition(" ")
            got = metric[len(name) :].strip("{}")
            if ",".join(sorted(got.split(","))) == want:
                return float(value)
    return None


@pytest.fixture
def log_capture() -> Iterator[LogCapture]:
    handler = LogCapture()
    loggers = [logging.getLogger(n) for n in ("kopf", "kubetune_operator")]
    old = [lg.level for lg in loggers]
    for lg in loggers:
        lg.addHandler(handler)
        lg.setLevel(logging.DEBUG)
    yield handler
    for lg, level in zip(loggers, old):
        lg.removeHandler(handler)
        lg.setLevel(level)


@pytest.mark.parametrize("mode", ["cluster-wide", "namespaced"])
def test_operator_with_chart_rbac(
    mode: str,
    render,
    helm: Path,
    kubectl: Path,
    control_plane: Any,
    kubeconfig: Path,
    namespace: str,
    chart_crds: list[str],
    log_capture: LogCapture,
) -> None:
    release = "kt-rbac"
    health_port, metrics_port = _free_port(), _free_port()
    values: dict[str, Any] = {"health": {"port": health_port}, "metrics": {"port": metrics_port}}
    if mode == "namespaced":
        values["watch"] = {"namespaces": [namespace]}
    values_file = Path(control_plane.workdir) / f"values-{namespace}.json"
    values_file.write_text(json.dumps(values))
    base = [helm, "--kubeconfig", kubeconfig, "--namespace", namespace]
    result = run([*base, "install", release, CHART, "--wait=hookOnly", "-f", values_file], timeout=300)
    assert result.returncode == 0, result.stderr
    admin = Kubectl(kubectl, kubeconfig, namespace)
    try:
        sa_kubeconfig = control_plane.kubeconfig_for_service_account(namespace, f"{release}-kubetune", create=False)
        _check_rbac_is_no_more(Kubectl(kubectl, sa_kubeconfig, namespace), namespace)
        settings = Settings.from_env(_chart_env(render, namespace, release, values))
        assert settings.namespaces == ((namespace,) if mode == "namespaced" else ())
        assert (settings.metrics_addr, settings.health_addr) == ("127.0.0.1", "127.0.0.1")
        # The Secret the example jobs name (the GitOps example makes it with an ExternalSecret); without it
        # the operator holds the jobs back (Blocked, SecretNotFound).
        admin(
            "create",
            "secret",
            "generic",
            "s3-credentials",
            "--from-literal=AWS_ACCESS_KEY_ID=AKIARBACTEST",
            "--from-literal=AWS_SECRET_ACCESS_KEY=rbac-test-secret-value",
        )
        operator = OperatorThread(settings, sa_kubeconfig)
        operator.start()
        try:
            _reconcile_and_settle(admin, namespace, health_port, metrics_port)
        finally:
            operator.stop()
        assert operator.error is None, repr(operator.error)
    finally:
        run([*base, "uninstall", release, "--wait"], timeout=300)

    # RBAC denials name the identity: 'User "system:serviceaccount:<ns>:<sa>" cannot <verb> resource ...'.
    forbidden = log_capture.matching(f'system:serviceaccount:{namespace}:{release}-kubetune" cannot')
    assert not forbidden, "the operator hit RBAC walls:\n" + "\n".join(forbidden)


def _check_rbac_is_no_more(sa: Kubectl, namespace: str) -> None:
    """Requests outside the chart's rules are refused with 403 (the API server's authorizer, not a 404)."""
    attempts = [
        ("get", "secrets"),  # a list: the operator may read a Secret a job names, never enumerate them
        ("get", "pods"),
        ("get", "nodes"),
        ("delete", "node", "some-node"),
        ("delete", "namespace", namespace, "--wait=false"),
        ("create", "clusterrolebinding", "kt-escalate", "--clusterrole=cluster-admin", "--user=me"),
        ("create", "secret", "generic", "kt-steal", "--from-literal=a=b"),
        ("delete", "serviceaccount", "anything"),  # (configmaps: shared servers delete registrations)
        ("delete", "finetunejobs.kubetune.io", "anything"),
    ]
    for args in attempts:
        result = sa(*args, check=False)
        assert result.returncode != 0 and "forbidden" in result.stderr.lower(), (args, result.stderr)

    # and what the rules grant, as the authorizer answers for this identity
    def can_i(verb: str, resource: str) -> str:
        kind, _, sub = resource.partition("/")
        argv = ["auth", "can-i", verb, kind] + ([f"--subresource={sub}"] if sub else [])
        return sa(*argv, check=False).stdout.strip()

    for verb, resource in (
        ("list", "finetunejobs.kubetune.io"),
        ("patch", "finetunejobs.kubetune.io/status"),
        ("create", "rayjobs.ray.io"),
        ("watch", "rayjobs.ray.io"),
        ("create", "configmaps"),
        ("create", "roles.rbac.authorization.k8s.io"),
        ("create", "events"),
        ("get", "secrets"),
        ("create", "networkpolicies.networking.k8s.io"),
    ):
        assert can_i(verb, resource) == "yes", (verb, resource)
    for verb, resource in (
        ("update", "finetunejobs.kubetune.io"),
        ("list", "secrets"),
        ("escalate", "roles"),
        ("bind", "roles"),
        ("create", "pods"),
        ("patch", "rayjobs.ray.io/status"),
        ("update", "finetunejobs.kubetune.io/status"),
        ("create", "pods/exec"),
        ("delete", "rayjobs.ray.io"),
    ):
        assert can_i(verb, resource) == "no", (verb, resource)


def _children(namespace: str, job: str) -> list[tuple[str, str]]:
    return [
        ("configmap", names.config_map(job)),
        ("serviceaccount", names.service_account(job)),
        ("role", names.role(job)),
        ("rolebinding", names.role_binding(job)),
        ("networkpolicy", names.network_policy(job)),
        ("rayjobs.ray.io", names.ray_job(job)),
    ]


def _versions(admin: Kubectl, namespace: str) -> dict[str, str]:
    out = {}
    for job in JOBS:
        for kind, name in [("finetunejobs.kubetune.io", job), *_children(namespace, job)]:
            obj = admin.get(kind, name)
            assert obj is not None, f"{kind}/{name} missing"
            out[f"{kind}/{name}"] = obj["metadata"]["resourceVersion"]
    return out


def _play_kuberay(admin: Kubectl, job: str, status: dict[str, Any]) -> None:
    admin(
        "patch",
        "rayjobs.ray.io",
        names.ray_job(job),
        "--subresource=status",
        "--type=merge",
        "-p",
        json.dumps({"status": status}),
    )


def _state(admin: Kubectl, job: str) -> str | None:
    obj = admin.get("finetunejobs.kubetune.io", job) or {}
    return (obj.get("status") or {}).get("state")


def _reconcile_and_settle(admin: Kubectl, namespace: str, health_port: int, metrics_port: int) -> None:
    def healthy() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{health_port}/healthz", timeout=5) as resp:
                return resp.status == 200
        except OSError:
            return False

    _wait("the chart's probe endpoint (/healthz) answering 200", healthy, timeout=30)
    before = _scrape(metrics_port)
    assert _sample(before, "kubetune_finetunejobs", namespace=namespace, state="Pending") in (None, 0.0)

    manifests = _example_jobs(namespace)
    admin("apply", "-f", "-", input=manifests)
    for job in JOBS:
        for kind, name in _children(namespace, job):
            _wait(f"{kind}/{name}", lambda k=kind, n=name: admin.get(k, n))
        _wait(f"{job} Pending", lambda j=job: _state(admin, j) == "Pending")
    text = _wait(
        "metrics: 2 Pending",
        lambda: (
            (t := _scrape(metrics_port))
            and _sample(t, "kubetune_finetunejobs", namespace=namespace, state="Pending") == 2
            and t
        ),
    )
    assert _sample(text, "kubetune_finetunejobs", namespace=namespace, state="Training") in (None, 0.0)

    # KubeRay starts both jobs.
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    for job in JOBS:
        _play_kuberay(
            admin,
            job,
            {
                "jobDeploymentStatus": "Running",
                "jobStatus": "RUNNING",
                "jobId": f"{job}-1",
                "startTime": started,
                "dashboardURL": f"{job}-head-svc:8265",
            },
        )
        _wait(f"{job} Training", lambda j=job: _state(admin, j) == "Training")
    text = _wait(
        "metrics: 2 Training",
        lambda: (
            (t := _scrape(metrics_port))
            and _sample(t, "kubetune_finetunejobs", namespace=namespace, state="Training") == 2
            and t
        ),
    )
    assert _sample(text, "kubetune_finetunejobs", namespace=namespace, state="Pending") == 0
    assert (
        _sample(text, "kubetune_finetunejob_conditions", namespace=namespace, condition="Training", status="True") == 2
    )

    # Settled: nothing changes for a while; then the same manifests again (what a GitOps sync does).
    _wait_quiet(admin, namespace)
    versions = _versions(admin, namespace)
    again = admin("apply", "-f", "-", input=manifests)
    assert again.stdout.count("unchanged") == len(JOBS), again.stdout
    diff = admin("diff", "-f", "-", input=manifests, check=False)
    assert diff.returncode == 0, f"kubectl diff sees drift:\n{diff.stdout}"
    time.sleep(3)
    assert _versions(admin, namespace) == versions, "re-applying the same manifests changed something"
    _assert_operator_never_owns_spec(admin)

    # KubeRay finishes the classifier (no deploy): Succeeded, counted, with its training duration.
    ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    _play_kuberay(
        admin, "ticket-classifier", {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": ended}
    )
    _wait("ticket-classifier Succeeded", lambda: _state(admin, "ticket-classifier") == "Succeeded")
    text = _wait(
        "metrics: 1 Succeeded",
        lambda: (
            (t := _scrape(metrics_port))
            and _sample(t, "kubetune_finetunejobs", namespace=namespace, state="Succeeded") == 1
            and t
        ),
    )
    assert _sample(text, "kubetune_finetunejobs", namespace=namespace, state="Training") == 1
    assert (_sample(text, "kubetune_training_duration_seconds_count", outcome="succeeded") or 0) >= 1
    assert (_sample(text, "kubetune_time_to_training_start_seconds_count") or 0) >= 2
    assert (_sample(text, "kubetune_reconcile_duration_seconds_count", handler="reconcile") or 0) >= 2

    if hasattr(names, "inference"):
        _serve_with_chart_rbac(admin, namespace)

    # Deleted jobs leave the counts.
    admin("delete", "finetunejobs.kubetune.io", *JOBS, "--wait=false")
    _wait(
        "metrics: 0 jobs",
        lambda: (
            (t := _scrape(metrics_port))
            and all(
                (_sample(t, "kubetune_finetunejobs", namespace=namespace, state=s) or 0) == 0
                for s in ("Pending", "Training", "Succeeded")
            )
        ),
    )


def _serve_with_chart_rbac(admin: Kubectl, namespace: str) -> None:
    """Serving with the chart's rights: KubeRay finishes the chat job, the operator creates the inference
    Deployment and Service; a GitOps change of spec.deploy replaces the Deployment; disabling deploy removes both."""
    job, name = "support-chat-lora", names.inference("support-chat-lora")
    ended = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + 1))
    _play_kuberay(admin, job, {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED", "endTime": ended})
    _wait("inference Deployment", lambda: admin.get("deployment", name))
    _wait("inference Service", lambda: admin.get("service", name))
    _wait(f"{job} Deploying", lambda: _state(admin, job) == "Deploying")

    doc = yaml.safe_load((EXAMPLES / "jobs" / f"{job}.yaml").read_text())
    doc["metadata"]["namespace"] = namespace
    doc["spec"]["deploy"].update({"replicas": 2, "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"}})
    admin("apply", "-f", "-", input=yaml.safe_dump(doc))
    _wait(
        "Deployment replaced with 2 replicas",
        lambda: (d := admin.get("deployment", name)) and d["spec"]["replicas"] == 2,
    )
    doc["spec"]["deploy"]["enabled"] = False
    admin("apply", "-f", "-", input=yaml.safe_dump(doc))
    _wait("serving removed", lambda: admin.get("deployment", name) is None and admin.get("service", name) is None)
    _wait(f"{job} Succeeded (nothing to serve)", lambda: _state(admin, job) == "Succeeded")


def _wait_quiet(admin: Kubectl, namespace: str, quiet_for: float = 4.0, timeout: float = 60.0) -> None:
    """Until no resourceVersion of the jobs and their children moved for `quiet_for` seconds."""
    deadline = time.monotonic() + timeout
    last, since = _versions(admin, namespace), time.monotonic()
    while time.monotonic() < deadline:
        time.sleep(0.5)
        now = _versions(admin, namespace)
        if now != last:
            last, since = now, time.monotonic()
        elif time.monotonic() - since >= quiet_for:
            return
    raise AssertionError(f"the jobs never settled: {last}")


def _argocd_ignored_annotations() -> set[str]:
    data = yaml.safe_load((ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml").read_text())["data"]
    ignore = yaml.safe_load(data["resource.customizations.ignoreDifferences.kubetune.io_FineTuneJob"])
    return {e.split('"')[1] for e in ignore["jqPathExpressions"] if e.startswith(".metadata.annotations[")}


def _assert_operator_never_owns_spec(admin: Kubectl) -> None:
    """managedFields: whoever is not the applier (the operator, kopf) owns no spec field, and the annotations
    kopf owns are the ones the Argo CD diff customisation ignores (deploy/argocd/argocd-cm-patch.yaml)."""
    ignored = _argocd_ignored_annotations()
    for job in JOBS:
        obj = json.loads(admin("get", "finetunejobs.kubetune.io", job, "-o", "json", "--show-managed-fields").stdout)
        managers = {e["manager"] for e in obj["metadata"].get("managedFields") or []}
        assert "kubectl-client-side-apply" in managers and "kopf" in managers, managers
        for entry in obj["metadata"]["managedFields"]:
            if entry["manager"] == "kubectl-client-side-apply":
                continue
            fields = entry.get("fieldsV1") or {}
            assert "f:spec" not in fields, f"{entry['manager']} owns spec fields of {job}: {fields}"
            if entry["manager"] == "kopf":
                owned = {k[2:] for k in fields.get("f:metadata", {}).get("f:annotations", {}) if k.startswith("f:")}
                assert owned and owned <= ignored, f"kopf annotations {owned} not all ignored by Argo CD ({ignored})"
