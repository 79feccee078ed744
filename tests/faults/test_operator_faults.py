"""The operator's faults, caused for real: the API server restarted, the operator killed at random moments,
Kueue driving suspend, names taken by objects that are not the job's, a missing Secret or key, S3 refusing the
keys, the leader replica killed; and at the end a scan for secret values in everything the tier produced.

Real parts: the session's kube-apiserver + etcd + kube-controller-manager, SeaweedFS, the operator as its own
process (`python -m kubetune_operator`, killed with SIGKILL). KubeRay is played by writing RayJob status the
way its controller does (kubetune_cli.localenv.kuberay); Kueue by patching the RayJob's spec.suspend, as Kueue
does. All tests share one namespace, watched by the operator processes these tests start.
"""

from __future__ import annotations

import base64
import json
import os
import random
import re
import secrets
import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, cast

import pytest
import yaml

from kubetune_operator import names
from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, KINDS, RAYJOB, Kube, load_configuration

pytestmark = [pytest.mark.faults, pytest.mark.integration, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]
SECRET = KINDS[("v1", "Secret")]
SERVICEACCOUNT = KINDS[("v1", "ServiceAccount")]
NETPOL = KINDS[("networking.k8s.io/v1", "NetworkPolicy")]
CHILD_KINDS = (
    CONFIGMAP,
    SERVICEACCOUNT,
    KINDS[("rbac.authorization.k8s.io/v1", "Role")],
    KINDS[("rbac.authorization.k8s.io/v1", "RoleBinding")],
    NETPOL,
    RAYJOB,
)
# Values that must never show up anywhere (the tier's Secrets); the leak scan at the end looks for each.
SECRET_VALUES: list[str] = []


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 120.0, interval: float = 0.3) -> Any:
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        try:
            last = fn()
        except Exception as e:  # noqa: BLE001 - the API server may be restarting: keep polling
            last = e
        if last and not isinstance(last, Exception):
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last: {last!r}")


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class OperatorProcess:
    """`python -m kubetune_operator` watching one namespace; kill() is SIGKILL, restart() starts it again."""

    def __init__(
        self,
        kubeconfig: Path,
        namespace: str,
        log_dir: Path,
        name: str = "operator",
        extra_env: dict[str, str] | None = None,
    ):
        self.kubeconfig, self.namespace, self.name = kubeconfig, namespace, name
        self.log = log_dir / f"{name}.log"
        self.extra_env = extra_env or {}
        self.health_port = free_port()
        self.metrics_port = free_port()
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def start(self, wait: bool = True) -> OperatorProcess:
        env = {
            **os.environ,
            "KUBETUNE_NAMESPACES": self.namespace,
            "KUBETUNE_HEALTH_ADDR": "127.0.0.1",
            "KUBETUNE_HEALTH_PORT": str(self.health_port),
            "KUBETUNE_METRICS_ADDR": "127.0.0.1",
            "KUBETUNE_METRICS_PORT": str(self.metrics_port),
            **self.extra_env,
        }
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator", "--kubeconfig", str(self.kubeconfig)],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        self.starts += 1
        if wait:
            self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 120) -> None:
        def healthy() -> bool:
            assert self.proc is not None and self.proc.poll() is None, self.log_tail()
            with urllib.request.urlopen(f"http://127.0.0.1:{self.health_port}/healthz", timeout=2) as r:
                return r.status == 200

        wait_for(f"{self.name} to be healthy", healthy, timeout=timeout, interval=0.5)

    def kill(self) -> None:
        """SIGKILL: no cleanup, no goodbye to peers, whatever request was in flight is cut off."""
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(timeout=30)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.kill()

    def metrics(self) -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics_port}/metrics", timeout=5) as r:
            return r.read().decode()

    def log_tail(self, lines: int = 40) -> str:
        return "\n".join(self.log.read_text(errors="replace").splitlines()[-lines:]) if self.log.exists() else ""

    def handled(self, job: str) -> int:
        """How many full passes this operator's log reports for `job` (kubetune_operator.handlers logs each)."""
        text = self.log.read_text(errors="replace") if self.log.exists() else ""
        return len(re.findall(rf" {re.escape(self.namespace)}/{re.escape(job)}: reconciled$", text, re.M))


# --------------------------------------------------------------------------------------------- fixtures


@pytest.fixture(scope="module")
def env(control_plane: Any, kubeconfig: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, Any]]:
    """The CRDs, one namespace with the job's credentials Secret, an admin client, KubeRay's part, an operator."""
    from kubetune_cli.localenv.kuberay import KubeRay

    control_plane.install_crds([ROOT / "crds" / "finetunejob.yaml", ROOT / "charts/kubetune/crds/kopf-peering.yaml"])
    kube = Kube(load_configuration(kubeconfig))
    ns = f"kt-faults-{secrets.token_hex(3)}"
    kube._call("create", "POST", "/api/v1/namespaces", body={"metadata": {"name": ns}})
    key_id, key = "AKIAFAULTS" + secrets.token_hex(5).upper(), "faults-" + secrets.token_urlsafe(24)
    SECRET_VALUES.extend([key_id, key])
    kube.create(_secret(ns, "s3-credentials", {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": key}))
    logs = tmp_path_factory.mktemp("operator-logs")
    op = OperatorProcess(kubeconfig, ns, logs).start()
    kuberay = KubeRay(kubeconfig)
    yield {
        "kube": kube,
        "ns": ns,
        "op": op,
        "kuberay": kuberay,
        "logs": logs,
        "cp": control_plane,
        "kubeconfig": kubeconfig,
    }
    op.stop()
    kuberay.close()
    kube._call("delete", "DELETE", f"/api/v1/namespaces/{ns}")
    kube.close()


def _secret(ns: str, name: str, data: dict[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": ns},
        "data": {k: base64.b64encode(v.encode()).decode() for k, v in data.items()},
    }


def job_manifest(name: str, ns: str, **spec_changes: Any) -> dict[str, Any]:
    m = yaml.safe_load((ROOT / "examples" / "lora-chat.yaml").read_text())
    m["metadata"] = {"name": name, "namespace": ns}
    m["spec"]["deploy"] = {"enabled": False}
    for key, value in spec_changes.items():
        m["spec"][key] = value
    return m


def condition(job: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    for c in ((job or {}).get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def wait_condition(
    kube: Kube, ns: str, job: str, type_: str, field: str, value: str, timeout: float = 60
) -> dict[str, Any]:
    """The job once its condition `type_` has `field` == `value`; on timeout the error shows every condition."""
    seen: list[Any] = []

    def check() -> dict[str, Any] | None:
        body = kube.get(FINETUNEJOB, ns, job)
        seen[:] = [((body or {}).get("status") or {}).get("conditions")]
        return body if condition(body, type_).get(field) == value else None

    try:
        return wait_for(f"{job}: {type_}.{field} == {value}", check, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(f"{e}; conditions: {seen}") from None


def children_of(kube: Kube, ns: str, job: str) -> dict[str, list[dict[str, Any]]]:
    """Every training object of the child kinds labelled with the job, by kind (the job's history ConfigMap,
    written when it ends, is not a training child)."""
    selector = f"kubetune.io/job={names.label_value(job)},app.kubernetes.io/component=training"
    return {kind.kind: kube.list(kind, ns, label_selector=selector) for kind in CHILD_KINDS}


def assert_one_of_each_and_owned(kube: Kube, ns: str, job: str) -> None:
    body = kube.get(FINETUNEJOB, ns, job)
    assert body is not None
    for kind, objs in children_of(kube, ns, job).items():
        assert len(objs) == 1, f"{job}: {len(objs)} {kind}s"
        refs = [r for r in objs[0]["metadata"].get("ownerReferences") or [] if r.get("controller")]
        assert [r["uid"] for r in refs] == [body["metadata"]["uid"]], f"{job}: {kind} not controlled by it"


def orphans(kube: Kube, ns: str) -> list[str]:
    """Children (labelled kubetune.io/job) whose controller is not a live FineTuneJob."""
    live = {j["metadata"]["uid"] for j in kube.list(FINETUNEJOB, ns)}
    out = []
    for kind in CHILD_KINDS:
        for obj in kube.list(kind, ns, label_selector="kubetune.io/job"):
            refs = [r for r in obj["metadata"].get("ownerReferences") or [] if r.get("controller")]
            if not refs or refs[0]["uid"] not in live:
                out.append(f"{kind.kind} {obj['metadata']['name']}")
    return out


def ray_job_made(kube: Kube, ns: str, job: str) -> dict[str, Any] | None:
    body = kube.get(FINETUNEJOB, ns, job)
    if not body or not ((body.get("status") or {}).get("rayJob") or {}).get("name"):
        return None
    return kube.get(RAYJOB, ns, names.ray_job(job))


# ------------------------------------------------------------------------------------------------ tests


def test_inline_keys_are_refused_by_the_api_server(env: dict[str, Any], fault_row: Any) -> None:
    """Without the webhook: the CRD's schema itself refuses inline keys, naming the field, never the value."""
    from kubetune_cli.localenv.binaries import find_kubectl

    leaked = "inline-" + secrets.token_urlsafe(16)
    SECRET_VALUES.append(leaked)
    m = job_manifest("inline-keys", env["ns"])
    m["spec"]["dataset"]["secretAccessKey"] = leaked
    proc = subprocess.run(
        [str(find_kubectl()), f"--kubeconfig={env['kubeconfig']}", "apply", "-f", "-"],
        input=yaml.safe_dump(m),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode != 0 and "spec.dataset.secretAccessKey" in proc.stderr, proc.stderr
    assert leaked not in proc.stderr + proc.stdout
    assert env["kube"].get(FINETUNEJOB, env["ns"], "inline-keys") is None  # nothing stored in etcd
    fault_row(
        "inline S3 keys in a spec (no webhook)",
        "refused by the CRD schema, field named, value not echoed",
        steps_redone=0,
        records_twice=0,
        recover_s="-",
    )


def _create_job(kube: Kube, ns: str, name: str, spec: dict[str, Any]) -> None:
    kube.create(
        {
            "apiVersion": "kubetune.io/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": ns},
            "spec": spec,
        }
    )


def _blocked(kube: Kube, ns: str, job: str, reason: str) -> dict[str, Any]:
    return cast(
        "dict[str, Any]",
        wait_for(
            f"{job} Blocked {reason}",
            lambda: (
                condition(kube.get(FINETUNEJOB, ns, job), "Blocked").get("reason") == reason
                and kube.get(FINETUNEJOB, ns, job)
            ),
            timeout=60,
        ),
    )


def test_missing_secret_then_missing_key_and_names_taken(env: dict[str, Any], fault_row: Any) -> None:
    """Two faults whose recoveries wait on the operator's timers, caused in the same window so the timers run
    side by side instead of one after the other: a job whose credentials Secret is missing, then lacks a key
    (each fix is seen at the next Secret re-check, every 15 s), and jobs whose ConfigMap / ServiceAccount names
    are taken by objects that are not theirs (NameConflict, tried again after 30 s). Each fault keeps its own
    asserts and its own row of the recovery table."""
    kube, ns = env["kube"], env["ns"]
    spec = job_manifest("needs-creds", ns)["spec"]
    spec["dataset"]["credentialsSecret"] = "later-creds"
    _create_job(kube, ns, "needs-creds", spec)
    squatters = {
        "cm-taken": {
            "apiVersion": "v1",
            "kind": "ConfigMap",
            "metadata": {"name": names.config_map("cm-taken"), "namespace": ns},
            "data": {"mine": "yes"},
        },
        "sa-taken": {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": names.service_account("sa-taken"), "namespace": ns},
        },
    }
    for job, obj in squatters.items():
        kube.create(obj)
        _create_job(kube, ns, job, job_manifest(job, ns)["spec"])

    # Missing Secret: Blocked, naming it and the key; nothing runs without its keys.
    blocked = _blocked(kube, ns, "needs-creds", "SecretNotFound")
    message = condition(blocked, "Blocked")["message"]
    assert f"{ns}/later-creds" in message and "AWS_ACCESS_KEY_ID" in message
    assert kube.get(RAYJOB, ns, names.ray_job("needs-creds")) is None  # nothing runs without its keys
    key_id = "AKIALATER" + secrets.token_hex(5).upper()
    SECRET_VALUES.append(key_id)
    kube.create(_secret(ns, "later-creds", {"AWS_ACCESS_KEY_ID": key_id}))

    # Names taken (meanwhile the Secret re-check runs): Blocked NameConflict, the objects neither adopted nor
    # changed, no RayJob; then the objects are removed.
    for job, obj in squatters.items():
        got = _blocked(kube, ns, job, "NameConflict")
        assert f"{obj['kind']} {ns}/{obj['metadata']['name']}" in condition(got, "Blocked")["message"]
        kind = CONFIGMAP if obj["kind"] == "ConfigMap" else SERVICEACCOUNT
        now = kube.get(kind, ns, obj["metadata"]["name"])
        assert not now["metadata"].get("ownerReferences"), "the job adopted an object it does not own"
        assert now.get("data") == obj.get("data")  # untouched
        assert kube.get(RAYJOB, ns, names.ray_job(job)) is None
    t_freed = time.monotonic()
    for obj in squatters.values():
        kind = CONFIGMAP if obj["kind"] == "ConfigMap" else SERVICEACCOUNT
        kube.delete(kind, ns, obj["metadata"]["name"])

    # Back to the Secret: it exists without the second key, then gets it.
    half = _blocked(kube, ns, "needs-creds", "SecretKeyMissing")
    assert "later-creds" in condition(half, "Blocked")["message"]
    assert "AWS_SECRET_ACCESS_KEY" in condition(half, "Blocked")["message"]
    fixed_value = "later-" + secrets.token_urlsafe(20)
    SECRET_VALUES.append(fixed_value)
    t0 = time.monotonic()
    kube.patch(
        SECRET, ns, "later-creds", {"data": {"AWS_SECRET_ACCESS_KEY": base64.b64encode(fixed_value.encode()).decode()}}
    )
    wait_for("the RayJob once the key exists", lambda: ray_job_made(kube, ns, "needs-creds"), timeout=90)
    recovered = time.monotonic() - t0
    job = kube.get(FINETUNEJOB, ns, "needs-creds")
    assert condition(job, "Blocked")["status"] == "False"
    # An hf:// model's token Secret is held to the same rule, the condition naming its field.
    gated = job_manifest("needs-token", ns)
    gated["spec"]["model"] = {"uri": "hf://org/gated", "tokenSecretRef": {"name": "hf-later"}}
    kube.create(gated)
    held = wait_condition(kube, ns, "needs-token", "Blocked", "reason", "SecretNotFound")
    assert f"Secret {ns}/hf-later (spec.model.tokenSecretRef) does not exist" in condition(held, "Blocked")["message"]
    assert kube.get(RAYJOB, ns, names.ray_job("needs-token")) is None
    kube.delete(FINETUNEJOB, ns, "needs-token")
    fault_row(
        "missing Secret, then a missing key",
        "Blocked naming Secret and key; ran once both existed",
        steps_redone=0,
        records_twice=0,
        recover_s=recovered,
    )

    # The names' jobs run once the names are free (at their next try).
    for job in squatters:
        wait_for(f"{job} to run once the name is free", lambda j=job: ray_job_made(kube, ns, j), timeout=120)
        assert_one_of_each_and_owned(kube, ns, job)
    fault_row(
        "pre-existing unowned ConfigMap / ServiceAccount",
        "Blocked NameConflict, left untouched; ran once removed",
        steps_redone=0,
        records_twice=0,
        recover_s=time.monotonic() - t_freed,
    )


def test_wrong_keys_fail_with_s3_access_denied(env: dict[str, Any], s3_server: Any, fault_row: Any) -> None:
    """The trainer's own classification of a real SeaweedFS refusal, handed on by KubeRay, read by the operator."""
    from kubetune import api
    from kubetune_trainer.__main__ import classify

    kube, ns, kuberay = env["kube"], env["ns"], env["kuberay"]
    wrong = "wrong-" + secrets.token_urlsafe(20)
    SECRET_VALUES.extend([wrong, s3_server.secret_key])
    m = job_manifest("wrong-keys", ns, backoffLimit=0)  # no KubeRay retry: the keys stay wrong
    m["spec"]["dataset"]["endpoint"] = s3_server.endpoint_url
    kube.create({**m, "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
    wait_for("the RayJob", lambda: ray_job_made(kube, ns, "wrong-keys"), timeout=60)
    kuberay.start(ns, names.ray_job("wrong-keys"))
    client = s3_server.client(retries=0, secret_key=wrong)
    try:
        client.list_objects_v2(Bucket="kubetune-test")
        raise AssertionError("SeaweedFS accepted a wrong secret key")
    except Exception as exc:  # noqa: BLE001 - botocore's ClientError
        cfg = api.resolve_trainer_config("wrong-keys", ns, "uid", api.parse_spec(m["spec"]))
        _, kind, message = classify(exc, cfg)
    last_line = f"kubetune-trainer: error: {kind}: {message}"
    t0 = time.monotonic()
    kuberay.fail(
        ns,
        names.ray_job("wrong-keys"),
        message=f"Job entrypoint command failed with exit code 1, last available logs:\n{last_line}\n",
    )
    job = wait_condition(kube, ns, "wrong-keys", "Failed", "reason", "S3AccessDenied")
    failed = condition(job, "Failed")["message"]
    assert s3_server.endpoint_url in failed and "kubetune-runs" in failed and "datasets" in failed
    assert wrong not in failed and s3_server.access_key not in failed
    fault_row(
        "wrong S3 keys",
        "Failed, reason S3AccessDenied naming endpoint and buckets",
        steps_redone=0,
        records_twice=0,
        recover_s=time.monotonic() - t0,
    )


def test_kueue_drives_suspend(env: dict[str, Any], fault_row: Any) -> None:
    kube, ns, kuberay, op = env["kube"], env["ns"], env["kuberay"], env["op"]
    rj = names.ray_job("queued")
    m = job_manifest("queued", ns, suspend=True)
    m["spec"]["resources"]["queue"] = "team-a"
    kube.create({**m, "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
    made = wait_for("the suspended RayJob", lambda: ray_job_made(kube, ns, "queued"), timeout=60)
    assert made["spec"]["suspend"] is True and made["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "team-a"
    kuberay.reconcile(ns, rj)  # KubeRay: New + suspend -> Suspended
    kuberay.set_suspend(ns, rj, False)  # Kueue admits the workload
    kuberay.resume(ns, rj)
    wait_for(
        "Training Running",
        lambda: condition(kube.get(FINETUNEJOB, ns, "queued"), "Training").get("reason") == "Running",
        timeout=60,
    )
    # The operator restarts: its resume pass must not re-suspend what Kueue admitted.
    before = op.handled("queued")
    op.kill()
    op.start()
    wait_for("the resume pass", lambda: op.handled("queued") > before, timeout=90)
    assert kube.get(RAYJOB, ns, rj)["spec"]["suspend"] is False
    # A label edit is a full pass too.
    before = op.handled("queued")
    kube.patch(FINETUNEJOB, ns, "queued", {"metadata": {"labels": {"team": "a"}}})
    wait_for("the label-edit pass", lambda: op.handled("queued") > before, timeout=90)
    assert kube.get(RAYJOB, ns, rj)["spec"]["suspend"] is False
    # Kueue preempts it; the operator leaves that alone too.
    kuberay.set_suspend(ns, rj, True)
    kuberay.suspend(ns, rj)
    wait_for(
        "Suspended",
        lambda: condition(kube.get(FINETUNEJOB, ns, "queued"), "Suspended").get("status") == "True",
        timeout=60,
    )
    before = op.handled("queued")
    kube.patch(FINETUNEJOB, ns, "queued", {"metadata": {"labels": {"team": "b"}}})
    wait_for("another pass", lambda: op.handled("queued") > before, timeout=90)
    assert kube.get(RAYJOB, ns, rj)["spec"]["suspend"] is True
    # The user's own edit of spec.suspend is passed on.
    t0 = time.monotonic()
    kube.patch(FINETUNEJOB, ns, "queued", {"spec": {"suspend": False}})
    wait_for(
        "the user's unsuspend on the RayJob", lambda: kube.get(RAYJOB, ns, rj)["spec"]["suspend"] is False, timeout=60
    )
    recovered = time.monotonic() - t0
    kube.patch(FINETUNEJOB, ns, "queued", {"spec": {"suspend": True}})
    wait_for(
        "the user's suspend on the RayJob", lambda: kube.get(RAYJOB, ns, rj)["spec"]["suspend"] is True, timeout=60
    )
    assert_one_of_each_and_owned(kube, ns, "queued")
    fault_row(
        "Kueue admits, preempts; operator restart; label edits; user edits suspend",
        "Kueue's suspend never undone; the user's edits passed on",
        steps_redone=0,
        records_twice=0,
        recover_s=recovered,
    )


def test_apiserver_restarted_mid_run(env: dict[str, Any], fault_row: Any) -> None:
    kube, ns, kuberay, cp = env["kube"], env["ns"], env["kuberay"], env["cp"]
    kube.create({**job_manifest("through-restart", ns), "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
    wait_for("the RayJob", lambda: ray_job_made(kube, ns, "through-restart"), timeout=60)
    rj = names.ray_job("through-restart")
    kuberay.start(ns, rj)
    wait_for(
        "Running",
        lambda: condition(kube.get(FINETUNEJOB, ns, "through-restart"), "Training").get("reason") == "Running",
        timeout=60,
    )
    down_and_up = cp.restart_apiserver(down_seconds=3)
    t0 = time.monotonic()
    wait_for("KubeRay's write after the restart", lambda: kuberay.succeed(ns, rj), timeout=60, interval=1)
    wait_for(
        "status catches up",
        lambda: condition(kube.get(FINETUNEJOB, ns, "through-restart"), "Succeeded").get("status") == "True",
        timeout=120,
        interval=0.5,
    )
    recovered = time.monotonic() - t0
    assert env["op"].proc.poll() is None, "the operator died with the API server"
    assert_one_of_each_and_owned(kube, ns, "through-restart")
    fault_row(
        "kube-apiserver restarted mid-run",
        f"status caught up (server back in {down_and_up:.0f} s), no duplicate children",
        steps_redone=0,
        records_twice=0,
        recover_s=recovered,
    )


def test_operator_killed_10_times_during_50_creations(env: dict[str, Any], fault_row: Any) -> None:
    kube, ns, op = env["kube"], env["ns"], env["op"]
    rng = random.Random(20261202)
    jobs = [f"burst-{i:02d}" for i in range(50)]
    for cycle in range(10):
        for job in jobs[cycle * 5 : (cycle + 1) * 5]:
            kube.create({**job_manifest(job, ns), "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
        time.sleep(rng.uniform(0.0, 2.0))  # a random moment: before, during or after the passes for these jobs
        op.kill()
        op.start(wait=cycle == 9)
    t0 = time.monotonic()
    for job in jobs:
        wait_for(f"{job}'s RayJob", lambda j=job: ray_job_made(kube, ns, j), timeout=240)
    recovered = time.monotonic() - t0
    for job in jobs:
        assert_one_of_each_and_owned(kube, ns, job)
    left = orphans(kube, ns)
    assert left == [], left
    fault_row(
        "operator killed 10x during 50 creations",
        "50 jobs, 0 duplicates, 0 orphans",
        steps_redone=0,
        records_twice=0,
        recover_s=recovered,
    )


def test_leader_killed_during_20_creations(env: dict[str, Any], fault_row: Any) -> None:
    kube, ns = env["kube"], env["ns"]
    env["op"].stop()  # the single operator steps aside for two peered replicas
    kube._call(
        "create",
        "POST",
        f"/apis/kopf.dev/v1/namespaces/{ns}/kopfpeerings",
        body={"apiVersion": "kopf.dev/v1", "kind": "KopfPeering", "metadata": {"name": "kt-faults"}},
    )
    replicas = [
        OperatorProcess(
            env["kubeconfig"],
            ns,
            env["logs"],
            name=f"replica-{i}",
            # A killed leader counts as alive for the peering lifetime after its last keep-alive: 10 s (default
            # 20) makes the takeover wait ~5-10 s instead of ~10-20 s. kopf keeps alive every lifetime - 5..10 s,
            # so a live leader's record still has the same 5-10 s to spare as with 20 s.
            extra_env={
                "KUBETUNE_PEERING": "kt-faults",
                "KUBETUNE_PEERING_PRIORITY": str(p),
                "KUBETUNE_PEERING_LIFETIME": "10",
            },
        )
        for i, p in ((0, 200), (1, 100))
    ]  # replica-0 leads (the higher priority)
    for r in replicas:
        r.start()
    leader, standby = replicas
    jobs = [f"peer-{i:02d}" for i in range(20)]
    try:
        for job in jobs[:5]:
            kube.create({**job_manifest(job, ns), "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
        wait_for("the leader at work", lambda: leader.handled(jobs[0]) > 0, timeout=90)
        assert standby.handled(jobs[0]) == 0, "the standby worked while the leader lived"
        leader.kill()
        killed_at = time.monotonic()
        for job in jobs[5:]:
            kube.create({**job_manifest(job, ns), "apiVersion": "kubetune.io/v1alpha1", "kind": "FineTuneJob"})
        wait_for("the standby to take over", lambda: any(standby.handled(j) for j in jobs[5:]), timeout=120)
        takeover = time.monotonic() - killed_at
        for job in jobs:
            wait_for(f"{job}'s RayJob", lambda j=job: ray_job_made(kube, ns, j), timeout=180)
            assert_one_of_each_and_owned(kube, ns, job)
        assert orphans(kube, ns) == []
    finally:
        for r in replicas:
            r.stop()
        env["op"].start()
    fault_row(
        "leader replica killed during 20 creations",
        "the standby finished them, no duplicates",
        steps_redone=0,
        records_twice=0,
        recover_s=takeover,
    )


def test_no_secret_value_anywhere(env: dict[str, Any], kubeconfig: Path, fault_row: Any) -> None:
    """Last: every log, status, Event, ConfigMap, RayJob, metrics page and CLI output of this tier."""
    from kubetune_cli.localenv.binaries import find_kubectl

    kube, ns = env["kube"], env["ns"]
    assert SECRET_VALUES, "no secret values were recorded: the scan would prove nothing"
    places: dict[str, str] = {}
    for log in sorted(env["logs"].glob("*.log")):
        places[f"log {log.name}"] = log.read_text(errors="replace")
    for kind in (FINETUNEJOB, CONFIGMAP, RAYJOB, NETPOL, KINDS[("v1", "Event")]):
        places[f"{kind.kind}s"] = json.dumps(kube.list(kind, ns))
    places["metrics"] = env["op"].metrics()
    kubectl = str(find_kubectl())
    for args in (["get", "ftj", "-o", "wide"], ["describe", "ftj"], ["get", "events"]):
        proc = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig}", "-n", ns, *args], capture_output=True, text=True, timeout=60
        )
        places[f"kubectl {' '.join(args)}"] = proc.stdout + proc.stderr
    cli = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", "status", "-n", ns, "wrong-keys"],
        env={**os.environ, "KUBECONFIG": str(kubeconfig)},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert cli.returncode == 0 and "wrong-keys" in cli.stdout + cli.stderr, cli.stderr
    places["kubetune status"] = cli.stdout + cli.stderr
    found = [
        (value[:6] + "...", where)
        for value in SECRET_VALUES
        for where, text in places.items()
        for variant in (value, base64.b64encode(value.encode()).decode())
        if variant in text
    ]
    assert found == [], found
    assert sum(len(t) for t in places.values()) > 10_000  # the scan really read something
    fault_row(
        "leak scan (logs, status, Events, ConfigMaps, RayJobs, metrics, CLI)",
        f"{len(SECRET_VALUES)} secret values, {len(places)} places: none found",
        steps_redone="-",
        records_twice="-",
        recover_s="-",
    )
