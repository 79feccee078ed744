"""Status: KubeRay's RayJob states -> conditions and state, transition times, merge patches, Events.

The RayJob statuses come from `kubetune_cli.localenv.kuberay.next_status` (KubeRay's state machine), so these
tests follow the same sequences the integration tests play against the API server.
"""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubetune_cli.localenv.kuberay import JobInfo, World, next_status
from kubetune_operator import conditions as c
from kubetune_operator.status import (
    KEEP,
    Observation,
    desired_status,
    phase_of,
    state_of,
    status_patch,
    transition_events,
)

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def ray_job(spec: dict | None = None) -> dict:
    return {
        "metadata": {"name": "chat", "namespace": "ns", "annotations": {"kubetune.io/spec-hash": "h1"}},
        "spec": {"backoffLimit": 0, **(spec or {})},
        "status": {},
    }


def step(rj: dict, world: World | None = None, at: datetime = T0) -> dict:
    return {**rj, "status": next_status(rj, world or World(), at)}


def conds(status: dict) -> dict[str, tuple[str, str]]:
    return {x["type"]: (x["status"], x["reason"]) for x in status["conditions"]}


def observe(current: dict | None, rj: dict | None, now: str = "2026-01-01T00:00:00Z", **kw) -> dict:
    obs = Observation(
        generation=kw.pop("generation", 1),
        spec_errors=kw.pop("spec_errors", None),
        ray_job_name="chat",
        ray_job=rj,
        **kw,
    )
    return desired_status(current, obs, now)


def run_to_running() -> list[dict]:
    rj = ray_job()
    seq = [rj]
    for world in (World(), World(cluster_ready=True), World(job=JobInfo("PENDING")), World(job=JobInfo("RUNNING"))):
        rj = step(rj, world)
        seq.append(rj)
    return seq


def test_happy_path_conditions_and_state() -> None:
    created, initializing, submitted, pending, running = run_to_running()
    # Running with no jobStatus yet (between Initializing and the first dashboard answer) counts as JobPending.
    assert submitted["status"]["jobDeploymentStatus"] == "Running" and not submitted["status"].get("jobStatus")
    expectations = [
        (created, "Pending", {"Training": ("False", "Pending")}),
        (initializing, "Pending", {"Training": ("False", "Initializing")}),
        (submitted, "Training", {"Training": ("True", "JobPending")}),
        (pending, "Training", {"Training": ("True", "JobPending")}),
        (
            running,
            "Training",
            {
                "Training": ("True", "Running"),
                "Failed": ("False", "Running"),
                "Succeeded": ("False", "Running"),
                "Suspended": ("False", "Running"),
            },
        ),
    ]
    status: dict = {}
    for rj, state, expected in expectations:
        status = observe(status, rj)
        assert status["state"] == state
        for type_, value in expected.items():
            assert conds(status)[type_] == value, (rj["status"], type_)
    assert status["rayJob"] == {
        "name": "chat",
        "jobId": running["status"]["jobId"],
        "dashboardURL": running["status"]["dashboardURL"],
        "jobStatus": "RUNNING",
        "jobDeploymentStatus": "Running",
    }
    assert status["startTime"] == "2026-01-01T00:00:00Z" and status["specHash"] == "h1"
    done = step(running, World(job=JobInfo("SUCCEEDED", end_time=T0)), at=T0 + timedelta(minutes=5))
    status = observe(status, done, now="2026-01-01T00:06:00Z")
    assert status["state"] == "Succeeded"
    assert conds(status)["Succeeded"] == ("True", "JobSucceeded")
    assert conds(status)["Training"] == ("False", "JobSucceeded")
    assert status["completionTime"] == "2026-01-01T00:05:00Z"  # KubeRay's endTime, not the observation time


@pytest.mark.parametrize(
    ("make", "reason", "message_part"),
    [
        (lambda rj: step(rj, World(job=JobInfo("FAILED", message="Traceback: boom"))), "AppFailed", "boom"),
        (
            lambda rj: step(rj, World(submitter_failed=("BackoffLimitExceeded", "too many"))),
            "SubmissionFailed",
            "Job submission has failed. Reason: BackoffLimitExceeded",
        ),
    ],
)
def test_failures_carry_kuberays_reason_and_message(make, reason, message_part) -> None:
    rj = make(run_to_running()[-1])
    assert rj["status"]["jobDeploymentStatus"] == "Failed"
    status = observe(None, rj)
    assert status["state"] == "Failed"
    failed = c.get(status["conditions"], c.FAILED)
    assert (failed["status"], failed["reason"]) == ("True", reason) and message_part in failed["message"]
    assert status["completionTime"]


def test_deadline_exceeded() -> None:
    rj = ray_job({"activeDeadlineSeconds": 60})
    for world in (World(), World(cluster_ready=True), World(job=JobInfo("RUNNING"))):
        rj = step(rj, world)
    rj = step(rj, World(job=JobInfo("RUNNING")), at=T0 + timedelta(seconds=61))
    status = observe(None, rj)
    failed = c.get(status["conditions"], c.FAILED)
    assert failed["reason"] == "DeadlineExceeded" and "activeDeadlineSeconds" in failed["message"]
    assert status["state"] == "Failed"


def test_retrying_stays_training_until_the_last_attempt_fails() -> None:
    rj = ray_job({"backoffLimit": 1})
    for world in (World(), World(cluster_ready=True), World(job=JobInfo("RUNNING"))):
        rj = step(rj, world)
    rj = step(rj, World(job=JobInfo("FAILED", message="oom")))
    assert rj["status"]["jobDeploymentStatus"] == "Retrying" and rj["status"]["failed"] == 1
    states = [observe(None, rj)]
    for world in (World(), World(), World(cluster_ready=True), World(job=JobInfo("RUNNING"))):
        rj = step(rj, world)  # Retrying -> New -> Initializing -> Running -> RUNNING
        states.append(observe(None, rj))
    assert [conds(s)["Training"] for s in states] == [
        ("True", "Retrying"),
        ("True", "Retrying"),
        ("True", "Retrying"),
        ("True", "JobPending"),
        ("True", "Running"),
    ]
    rj = step(rj, World(job=JobInfo("FAILED", message="oom again")))
    assert rj["status"]["jobDeploymentStatus"] == "Failed" and rj["status"]["failed"] == 2
    assert conds(observe(None, rj))["Failed"] == ("True", "AppFailed")


def test_suspend_and_resume() -> None:
    running = run_to_running()[-1]
    rj = {**running, "spec": {**running["spec"], "suspend": True}}
    rj = step(rj)
    s1 = observe(None, rj)
    assert conds(s1)["Suspended"] == ("True", "Suspending") and s1["state"] == "Suspended"
    rj = step(rj)
    s2 = observe(s1, rj)
    assert conds(s2)["Suspended"] == ("True", "Suspended")
    assert "jobId" not in s2["rayJob"]  # KubeRay cleared it; the mirror follows
    rj = step({**rj, "spec": {**rj["spec"], "suspend": False}})
    s3 = observe(s2, rj)
    assert conds(s3)["Suspended"] == ("False", "Pending") and s3["state"] == "Pending"


def test_stopped_is_a_failure() -> None:
    rj = step(run_to_running()[-1], World(job=JobInfo("STOPPED")))
    status = observe(None, rj)
    assert conds(status)["Failed"] == ("True", "Stopped")


def test_invalid_spec_before_any_ray_job() -> None:
    status = observe(
        None, None, spec_errors=[("spec.training.lora", "LoRA settings are only allowed with method: lora")]
    )
    assert conds(status)["Validated"] == ("False", "Invalid")
    failed = c.get(status["conditions"], c.FAILED)
    assert failed["reason"] == "Invalid" and failed["message"].startswith("spec.training.lora: ")
    assert status["state"] == "Failed"
    # Fixed: the RayJob gets created and the failure goes away, with its completion time.
    fixed = observe(status, ray_job(), generation=2)
    assert conds(fixed)["Failed"] == ("False", "Pending") and "completionTime" not in fixed
    assert status_patch(status, fixed)["completionTime"] is None


def test_deleted_ray_job_fails_an_unfinished_run_only() -> None:
    running = observe(None, run_to_running()[-1])
    gone = desired_status(running, Observation(ray_job_name="chat", ray_job=None, ray_job_deleted=True), "t")
    assert conds(gone)["Failed"] == ("True", "RayJobDeleted")
    done = observe(None, step(run_to_running()[-1], World(job=JobInfo("SUCCEEDED"))))
    after = desired_status(done, Observation(ray_job_name="chat", ray_job=None, ray_job_deleted=True), "t")
    assert after == done  # the record of a finished run stays


def test_transition_time_kept_while_status_unchanged() -> None:
    seq = run_to_running()
    s1 = observe(None, seq[3], now="2026-01-01T00:00:01Z")
    s2 = observe(s1, seq[4], now="2026-01-01T00:00:09Z")
    t1, t2 = c.get(s1["conditions"], c.TRAINING), c.get(s2["conditions"], c.TRAINING)
    assert t1["status"] == t2["status"] == "True" and t1["reason"] != t2["reason"]
    assert t2["lastTransitionTime"] == "2026-01-01T00:00:01Z"
    assert c.get(s2["conditions"], c.FAILED)["lastTransitionTime"] == "2026-01-01T00:00:01Z"


def test_patch_names_only_changed_owned_keys() -> None:
    seq = run_to_running()
    current = {**observe(None, seq[4]), "progress": {"step": 10, "loss": 1.5}, "data": {"records": 3}}
    same = observe(current, seq[4], now="2030-01-01T00:00:00Z")
    assert status_patch(current, same) == {}  # nothing changed: no request at all
    done = observe(current, step(seq[4], World(job=JobInfo("SUCCEEDED"))))
    patch = status_patch(current, done)
    assert set(patch) <= {
        "observedGeneration",
        "state",
        "conditions",
        "rayJob",
        "startTime",
        "completionTime",
        "specHash",
    }
    assert "progress" not in patch and "data" not in patch
    assert patch["rayJob"] == {"jobStatus": "SUCCEEDED", "jobDeploymentStatus": "Complete"}


def test_status_only_pass_keeps_spec_conditions() -> None:
    rejected = observe(
        None,
        run_to_running()[-1],
        rejected_fields=["spec.training.learningRate"],
        rejection_message="spec.training.learningRate: immutable",
    )
    assert conds(rejected)["SpecChangeRejected"] == ("True", "TrainingFieldsImmutable")
    later = desired_status(rejected, Observation(ray_job_name="chat", ray_job=run_to_running()[-1]), "t")
    assert conds(later)["SpecChangeRejected"] == ("True", "TrainingFieldsImmutable")
    assert later["observedGeneration"] == 1
    reverted = observe(later, run_to_running()[-1], rejected_fields=[], generation=3)
    assert conds(reverted)["SpecChangeRejected"] == ("False", "SpecMatchesRun")
    assert all(x["observedGeneration"] == 3 for x in reverted["conditions"])


def test_events_one_per_transition() -> None:
    seq = run_to_running()
    s_pending = observe(None, seq[3])
    s_running = observe(s_pending, seq[4])
    assert [(e.type, e.reason) for e in transition_events(s_pending, s_running)] == [("Normal", "Running")]
    assert transition_events(s_running, observe(s_running, seq[4])) == []
    failed = observe(s_running, step(seq[4], World(job=JobInfo("FAILED", message="x"))))
    assert [(e.type, e.reason) for e in transition_events(s_running, failed)] == [("Warning", "AppFailed")]
    invalid = observe(None, None, spec_errors=[("spec.x", "bad")])
    assert [(e.type, e.reason) for e in transition_events(None, invalid)] == [("Warning", "Invalid")]


def test_state_summary_knows_serving() -> None:
    base = [{"type": "Succeeded", "status": "True"}]
    assert state_of(base) == "Succeeded"
    assert state_of(base + [{"type": "Deployed", "status": "False"}]) == "Deploying"
    assert state_of(base + [{"type": "Deployed", "status": "True"}]) == "Deployed"
    assert state_of([{"type": "Failed", "status": "True"}, *base]) == "Failed"


def test_set_condition_orders_and_keeps_foreign_types() -> None:
    out = c.set_condition(
        [{"type": "Custom", "status": "True"}], c.FAILED, "False", "Running", "m", now="t", generation=1
    )
    out = c.set_condition(out, c.VALIDATED, "True", "Valid", "m", now="t", generation=1)
    assert [x["type"] for x in out] == ["Validated", "Failed", "Custom"]


def test_unknown_phase_is_pending_not_a_crash() -> None:
    rj = {"metadata": {"name": "x"}, "status": {"jobDeploymentStatus": "SomethingNew"}}
    assert phase_of(rj).reason == "Pending"
    assert KEEP is not None
