"""A FineTuneJob's life against the real API server: `kubectl apply` of the examples, the children the operator
creates (validated by KubeRay's real CRD, nothing pruned), and the status and `kubectl get ftj` columns
following the RayJob as KubeRay moves it (played by kubetune_cli.localenv.kuberay).
"""

from __future__ import annotations

import json
import logging
from typing import Any

import pytest
from op_support import (
    EXAMPLES,
    condition,
    events,
    first_difference,
    get_columns,
    load_example,
    put_s3_secret,
    wait_for,
)

from kubetune import api
from kubetune_operator import builders, names, policy
from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kind
from kubetune_operator.meta import Owner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROLE = Kind("rbac.authorization.k8s.io/v1", "Role", "roles")
ROLE_BINDING = Kind("rbac.authorization.k8s.io/v1", "RoleBinding", "rolebindings")
SERVICE_ACCOUNT = Kind("v1", "ServiceAccount", "serviceaccounts")
NETWORK_POLICY = Kind("networking.k8s.io/v1", "NetworkPolicy", "networkpolicies")


def ftj(kube: Any, ns: str, name: str) -> dict:
    return kube.get(FINETUNEJOB, ns, name)


def wait_state(kube: Any, ns: str, name: str, state: str, timeout: float = 60) -> dict:
    return wait_for(
        f"{name} in state {state}",
        lambda: (j := ftj(kube, ns, name)) and (j.get("status") or {}).get("state") == state and j,
        timeout=timeout,
    )


def wait_condition(
    kube: Any, ns: str, name: str, type_: str, status: str, reason: str | None = None, timeout: float = 60
) -> dict:
    def ok() -> dict | None:
        j = ftj(kube, ns, name)
        c = condition(j or {}, type_)
        return j if c.get("status") == status and (reason is None or c.get("reason") == reason) else None

    return wait_for(f"{name}: {type_}={status} ({reason})", ok, timeout=timeout)


def wait_ray_job(kube: Any, ns: str, job: str) -> dict:
    return wait_for(f"RayJob of {job}", lambda: kube.get(RAYJOB, ns, names.ray_job(job)), timeout=60)


@pytest.fixture
def s3_secret(kube: Any, namespace: str) -> str:
    """The Secret the examples name; its value must never show up anywhere the operator writes."""
    put_s3_secret(kube, namespace, "AKIAKUBETUNETEST0001", "kubetune-secret-value-do-not-leak")
    return "kubetune-secret-value-do-not-leak"


@pytest.mark.parametrize("example", sorted(p.stem for p in EXAMPLES.glob("*.yaml")))
def test_example_creates_children_that_servers_accept_unpruned(
    example: str, operator: Any, kubectl: Any, kube: Any, namespace: str, control_plane: Any
) -> None:
    manifest = load_example(example)
    name, _, spec = api.parse_manifest(manifest)  # every example parses with the API models
    kubectl.apply(EXAMPLES / f"{example}.yaml", namespace)
    ray = wait_ray_job(kube, namespace, name)
    job = wait_state(kube, namespace, name, "Pending")

    # Build locally what the operator should have sent, and compare with what the server kept.
    owner = Owner.from_body(job)
    expected = builders.training_children(owner, spec, operator.settings, policy.spec_hash(job["spec"]))
    kinds = {
        "ConfigMap": CONFIGMAP,
        "ServiceAccount": SERVICE_ACCOUNT,
        "Role": ROLE,
        "RoleBinding": ROLE_BINDING,
        "NetworkPolicy": NETWORK_POLICY,
        "RayJob": RAYJOB,
    }
    for obj in expected:
        stored = kube.get(kinds[obj["kind"]], namespace, obj["metadata"]["name"])
        assert stored is not None, f"{obj['kind']} {obj['metadata']['name']} missing"
        assert first_difference(obj, stored) is None, f"{obj['kind']}: {first_difference(obj, stored)}"
    assert control_plane.kuberay is not None and control_plane.kuberay.strict  # KubeRay's schema validated it
    from kubetune_operator.builders.rayjob import worker_replicas  # workers x concurrent trials when tuning

    assert ray["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == worker_replicas(spec)

    status = job["status"]
    assert status["observedGeneration"] == job["metadata"]["generation"]
    assert status["rayJob"] == {"name": names.ray_job(name)}
    assert status["specHash"] == policy.spec_hash(job["spec"])
    assert condition(job, "Validated")["status"] == "True"
    assert condition(job, "Training") | {"lastTransitionTime": None} == {
        "type": "Training",
        "status": "False",
        "reason": "Pending",
        "lastTransitionTime": None,
        "message": f"RayJob {names.ray_job(name)} created; waiting for KubeRay",
        "observedGeneration": 1,
    }
    ((kind, reason, message),) = events(kubectl, namespace, name)  # one Event: what was made, what it waits for
    assert (kind, reason) == ("Normal", "Created")
    assert message == (
        f"created ConfigMap {names.config_map(name)}, ServiceAccount {names.service_account(name)}, "
        f"Role {names.role(name)}, RoleBinding {names.role_binding(name)}, "
        f"NetworkPolicy {names.network_policy(name)}, RayJob {names.ray_job(name)}; "
        f"RayJob {names.ray_job(name)} created; waiting for KubeRay"
    )
    # kopf keeps its bookkeeping in annotations under our prefix, not in status (which the schema prunes).
    assert "kopf" not in status
    wait_for(
        "kopf to record the handled spec in a kubetune.io/ annotation", lambda: _settled(ftj(kube, namespace, name))
    )


def test_status_and_columns_follow_the_run_to_success(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    namespace: str,
    control_plane: Any,
    s3_secret: str,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.DEBUG)
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    rj = wait_ray_job(kube, namespace, "lora-chat")["metadata"]["name"]
    assert get_columns(kubectl, namespace, "lora-chat")["STATUS"] in ("", "Pending")

    kuberay.initialize(namespace, rj)
    wait_condition(kube, namespace, "lora-chat", "Training", "False", "Initializing")
    kuberay.start(namespace, rj)
    job = wait_condition(kube, namespace, "lora-chat", "Training", "True", "Running")
    assert job["status"]["state"] == "Training"
    ray_status = kube.get(RAYJOB, namespace, rj)["status"]
    assert job["status"]["rayJob"] == {
        "name": rj,
        "jobId": ray_status["jobId"],
        "dashboardURL": ray_status["dashboardURL"],
        "jobStatus": "RUNNING",
        "jobDeploymentStatus": "Running",
    }
    assert job["status"]["startTime"] == ray_status["startTime"]

    # The trainer reports progress as its own ServiceAccount, through the status subresource.
    trainer = control_plane.kubeconfig_for_service_account(namespace, names.service_account("lora-chat"), create=False)
    from kubetune_operator.kube import Kube, load_configuration

    as_trainer = Kube(load_configuration(trainer))
    try:
        as_trainer.patch_status(
            FINETUNEJOB,
            namespace,
            "lora-chat",
            {"progress": {"step": 40, "totalSteps": 100, "percent": 40, "loss": 1.25}},
        )
    finally:
        as_trainer.close()
    cols = wait_for(
        "progress columns", lambda: (c := get_columns(kubectl, namespace, "lora-chat"))["PROGRESS"] == "40" and c
    )
    assert cols["STATUS"] == "Training" and cols["LOSS"] == "1.25" and cols["ENDPOINT"] == ""

    kuberay.succeed(namespace, rj)
    job = wait_condition(kube, namespace, "lora-chat", "Succeeded", "True", "JobSucceeded")
    # deploy.enabled: once serving (issue 4) is in, the summary moves on to Deploying.
    assert job["status"]["state"] in ("Succeeded", "Deploying")
    assert job["status"]["completionTime"] == kube.get(RAYJOB, namespace, rj)["status"]["endTime"]
    assert job["status"]["progress"]["loss"] == 1.25, "the operator's status write clobbered the trainer's progress"
    cols = get_columns(kubectl, namespace, "lora-chat")
    assert (cols["STATUS"], cols["PROGRESS"], cols["LOSS"]) == (job["status"]["state"], "40", "1.25")
    reasons = [e[1] for e in events(kubectl, namespace, "lora-chat")]
    expected = ["Created", "Initializing", "JobPending", "Running", "JobSucceeded"]
    seen = reasons[:1] + [r for r in reasons[1:] if r in expected[1:]]  # serving adds Events of its own
    assert seen[:5] == expected, reasons

    # Secrets: referenced by name only; their value appears in no status, Event, child or log line.
    everything = json.dumps([job, kubectl.json("get", "events,cm,rayjob", "-n", namespace)])
    assert s3_secret not in everything and s3_secret not in caplog.text
    assert "AKIAKUBETUNETEST0001" not in everything and "AKIAKUBETUNETEST0001" not in caplog.text


def test_trainer_identity_reaches_only_its_own_job(
    operator: Any, kubectl: Any, kube: Any, namespace: str, control_plane: Any
) -> None:
    from kubetune_operator.kube import Kube, KubeError, load_configuration

    for name in ("job-a", "job-b"):
        m = load_example("sequence-classification")
        m["metadata"]["name"] = name
        kubectl.apply(m, namespace)
    for name in ("job-a", "job-b"):
        wait_ray_job(kube, namespace, name)
    cfg = control_plane.kubeconfig_for_service_account(namespace, names.service_account("job-a"), create=False)
    trainer = Kube(load_configuration(cfg))
    try:
        assert trainer.get(FINETUNEJOB, namespace, "job-a")["metadata"]["name"] == "job-a"
        trainer.patch_status(FINETUNEJOB, namespace, "job-a", {"data": {"records": 10}})
        for attempt in (
            lambda: trainer.patch_status(FINETUNEJOB, namespace, "job-b", {"data": {"records": 1}}),
            lambda: trainer.get(FINETUNEJOB, namespace, "job-b"),
            lambda: trainer.patch(FINETUNEJOB, namespace, "job-a", {"spec": {"suspend": True}}),
            lambda: trainer.get(CONFIGMAP, namespace, names.config_map("job-a")),
        ):
            with pytest.raises(KubeError) as err:
                attempt()
            assert err.value.status == 403
    finally:
        trainer.close()
    assert kube.get(FINETUNEJOB, namespace, "job-a")["status"]["data"] == {"records": 10}


def test_failure_shows_kuberays_reason(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "sequence-classification.yaml", namespace)  # backoffLimit 0
    rj = wait_ray_job(kube, namespace, "ticket-classifier")["metadata"]["name"]
    kuberay.start(namespace, rj)
    wait_state(kube, namespace, "ticket-classifier", "Training")
    kuberay.fail(namespace, rj, message="Job entrypoint command failed with exit code 1: CUDA out of memory")
    job = wait_state(kube, namespace, "ticket-classifier", "Failed")
    failed = condition(job, "Failed")
    assert (failed["status"], failed["reason"]) == ("True", "AppFailed")
    assert "CUDA out of memory" in failed["message"]
    assert get_columns(kubectl, namespace, "ticket-classifier")["STATUS"] == "Failed"
    assert ("Warning", "AppFailed") in [(t, r) for t, r, _ in events(kubectl, namespace, "ticket-classifier")]
    described = kubectl.run("describe", "ftj", "ticket-classifier", "-n", namespace).stdout
    assert "AppFailed" in described and "CUDA out of memory" in described


def test_submission_failure(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "sequence-classification.yaml", namespace)
    rj = wait_ray_job(kube, namespace, "ticket-classifier")["metadata"]["name"]
    kuberay.initialize(namespace, rj)
    kuberay.reconcile(namespace, rj)  # Initializing -> Running
    kuberay.fail_submission(namespace, rj)
    job = wait_condition(kube, namespace, "ticket-classifier", "Failed", "True", "SubmissionFailed")
    assert "Job submission has failed" in condition(job, "Failed")["message"]


def test_deadline_exceeded_is_not_retried(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    m = load_example("lora-chat")
    m["spec"]["activeDeadlineSeconds"] = 3600  # backoffLimit stays 1: a deadline is final anyway
    kubectl.apply(m, namespace)
    rj = wait_ray_job(kube, namespace, "lora-chat")["metadata"]["name"]
    kuberay.start(namespace, rj)
    wait_state(kube, namespace, "lora-chat", "Training")
    kuberay.pass_deadline(namespace, rj)
    job = wait_condition(kube, namespace, "lora-chat", "Failed", "True", "DeadlineExceeded")
    assert "ActiveDeadlineSeconds: 3600" in condition(job, "Failed")["message"]
    assert job["status"]["state"] == "Failed"
    assert get_columns(kubectl, namespace, "lora-chat")["STATUS"] == "Failed"


def test_retry_keeps_training_then_fails(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)  # backoffLimit 1
    rj = wait_ray_job(kube, namespace, "lora-chat")["metadata"]["name"]
    kuberay.start(namespace, rj)
    wait_state(kube, namespace, "lora-chat", "Training")
    kuberay.fail(namespace, rj, message="worker lost")
    job = wait_condition(kube, namespace, "lora-chat", "Training", "True", "Retrying")
    assert job["status"]["state"] == "Training" and condition(job, "Failed")["status"] == "False"
    kuberay.retry(namespace, rj)  # Retrying -> New
    kuberay.start(namespace, rj)
    wait_condition(kube, namespace, "lora-chat", "Training", "True", "Running")
    kuberay.fail(namespace, rj, message="worker lost again")
    job = wait_condition(kube, namespace, "lora-chat", "Failed", "True", "AppFailed")
    assert kube.get(RAYJOB, namespace, rj)["status"]["failed"] == 2
    assert "worker lost again" in condition(job, "Failed")["message"]


def test_suspend_is_live(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    rj = wait_ray_job(kube, namespace, "lora-chat")["metadata"]["name"]
    kuberay.start(namespace, rj)
    wait_state(kube, namespace, "lora-chat", "Training")
    kubectl.run("patch", "ftj", "lora-chat", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":true}}')
    wait_for("suspend passed to the RayJob", lambda: kube.get(RAYJOB, namespace, rj)["spec"]["suspend"] is True)
    kuberay.suspend(namespace, rj)
    job = wait_condition(kube, namespace, "lora-chat", "Suspended", "True", "Suspended")
    assert job["status"]["state"] == "Suspended" and job["status"]["observedGeneration"] == 2
    assert condition(job, "SpecChangeRejected") == {}
    kubectl.run("patch", "ftj", "lora-chat", "-n", namespace, "--type=merge", "-p", '{"spec":{"suspend":false}}')
    wait_for("resume passed to the RayJob", lambda: kube.get(RAYJOB, namespace, rj)["spec"]["suspend"] is False)
    kuberay.resume(namespace, rj)
    job = wait_state(kube, namespace, "lora-chat", "Training")
    assert condition(job, "Suspended")["status"] == "False"


def test_created_suspended_as_kueue_does(operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str) -> None:
    m = load_example("sequence-classification")
    m["spec"]["suspend"] = True
    kubectl.apply(m, namespace)
    rj = wait_ray_job(kube, namespace, "ticket-classifier")
    assert rj["spec"]["suspend"] is True
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
    name = rj["metadata"]["name"]
    kuberay.initialize(namespace, name)
    kuberay.suspend(namespace, name)
    wait_state(kube, namespace, "ticket-classifier", "Suspended")


def test_deleting_the_ray_job_mid_run_fails_the_job(
    operator: Any, kubectl: Any, kube: Any, kuberay: Any, namespace: str
) -> None:
    kubectl.apply(EXAMPLES / "sequence-classification.yaml", namespace)
    rj = wait_ray_job(kube, namespace, "ticket-classifier")["metadata"]["name"]
    kuberay.start(namespace, rj)
    wait_state(kube, namespace, "ticket-classifier", "Training")
    kube.delete(RAYJOB, namespace, rj)
    kuberay.remove_finalizer(namespace, rj)  # what KubeRay does for a RayJob being deleted
    job = wait_condition(kube, namespace, "ticket-classifier", "Failed", "True", "RayJobDeleted")
    # Never re-run a training behind the user's back: no new RayJob appears, even after a spec change.
    kubectl.run(
        "patch", "ftj", "ticket-classifier", "-n", namespace, "--type=merge", "-p", '{"spec":{"backoffLimit":2}}'
    )
    wait_for(
        "generation 2 observed",
        lambda: ftj(kube, namespace, "ticket-classifier")["status"].get("observedGeneration") == 2,
    )
    assert kube.get(RAYJOB, namespace, rj) is None
    assert job["status"]["state"] == "Failed"


def test_deleting_the_job_removes_its_children(operator: Any, kubectl: Any, kube: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    wait_ray_job(kube, namespace, "lora-chat")
    selector = "kubetune.io/job=lora-chat"
    kinds = "configmap,serviceaccount,role,rolebinding,rayjob"
    assert len(kubectl.names(kinds, namespace, selector)) == 5
    kubectl.run("delete", "ftj", "lora-chat", "-n", namespace, "--wait=true", timeout=120)
    wait_for(
        "the garbage collector to delete every child",
        lambda: kubectl.names(kinds, namespace, selector) == [],
        timeout=120,
        interval=0.5,
    )


def test_reapplying_is_a_no_op(operator: Any, kubectl: Any, kube: Any, namespace: str) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    rj = wait_ray_job(kube, namespace, "lora-chat")
    wait_state(kube, namespace, "lora-chat", "Pending")
    before = wait_for("kopf to record the handled spec", lambda: _settled(ftj(kube, namespace, "lora-chat")))
    out = kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace).stdout
    assert "unchanged" in out
    after = ftj(kube, namespace, "lora-chat")
    assert after["metadata"]["resourceVersion"] == before["metadata"]["resourceVersion"]
    assert kube.get(RAYJOB, namespace, rj["metadata"]["name"])["metadata"]["uid"] == rj["metadata"]["uid"]


def _settled(job: dict) -> dict | None:
    """The job once kopf has stored the handled spec and dropped its in-progress marks."""
    ours = {k for k in job["metadata"].get("annotations", {}) if k.startswith("kubetune.io/")}
    done = {"kubetune.io/last-handled-configuration", "kubetune.io/kopf-managed"}
    return job if ours == done else None
