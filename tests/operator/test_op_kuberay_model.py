"""kubetune_cli.localenv.kuberay.next_status: one pass of KubeRay's RayJob controller, checked against the
transitions rayjob_controller.go makes."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest

from kubetune_cli.localenv.kuberay import JobInfo, World, next_status, status_changed

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def rj(spec: dict | None = None, status: dict | None = None) -> dict:
    return {"metadata": {"name": "chat", "namespace": "ns"}, "spec": spec or {}, "status": status or {}}


def test_new_initializes_ids_and_start_time() -> None:
    st = next_status(rj(), World(), T0)
    assert st["jobDeploymentStatus"] == "Initializing"
    assert st["jobId"].startswith("chat-") and len(st["jobId"]) == len("chat-") + 5
    assert st["rayClusterName"].startswith("chat-raycluster-")
    assert st["startTime"] == "2026-01-01T00:00:00Z"
    assert st["failed"] == 0 and st["succeeded"] == 0


def test_initializing_waits_for_the_cluster_then_runs() -> None:
    init = next_status(rj(), World(), T0)
    assert next_status(rj(status=init), World(cluster_ready=False), T0)["jobDeploymentStatus"] == "Initializing"
    st = next_status(rj(status=init), World(cluster_ready=True), T0)
    assert st["jobDeploymentStatus"] == "Running"
    assert st["dashboardURL"] == f"{init['rayClusterName']}-head-svc.ns.svc.cluster.local:8265"


def test_success_sets_end_time_and_counter() -> None:
    st = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": "2026-01-01T00:00:00Z"}
    done = next_status(rj(status=st), World(job=JobInfo("SUCCEEDED", end_time=T0)), T0 + timedelta(seconds=9))
    assert done["jobDeploymentStatus"] == "Complete" and done["jobStatus"] == "SUCCEEDED"
    assert done["endTime"] == "2026-01-01T00:00:09Z" and done["succeeded"] == 1
    assert done["rayJobInfo"]["endTime"] == "2026-01-01T00:00:00Z"


def test_terminal_job_waits_for_the_submitter() -> None:
    st = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": "2026-01-01T00:00:00Z"}
    out = next_status(rj(status=st), World(job=JobInfo("SUCCEEDED"), submitter_finished=False), T0)
    assert out["jobDeploymentStatus"] == "Running" and out["jobStatus"] == "SUCCEEDED"


def test_deadline_and_no_retry_after_it() -> None:
    st = {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": "2026-01-01T00:00:00Z"}
    out = next_status(
        rj({"activeDeadlineSeconds": 10, "backoffLimit": 3}, st),
        World(job=JobInfo("RUNNING")),
        T0 + timedelta(seconds=10),
    )
    assert out["jobDeploymentStatus"] == "Failed" and out["reason"] == "DeadlineExceeded"
    assert out["message"].startswith("The RayJob has passed the activeDeadlineSeconds.")


def test_suspend_resets_the_run() -> None:
    st = {
        "jobDeploymentStatus": "Running",
        "jobStatus": "RUNNING",
        "jobId": "chat-abcde",
        "dashboardURL": "x:8265",
        "rayClusterName": "c",
        "startTime": "2026-01-01T00:00:00Z",
    }
    s1 = next_status(rj({"suspend": True}, st), World(), T0)
    assert s1["jobDeploymentStatus"] == "Suspending"
    s2 = next_status(rj({"suspend": True}, s1), World(), T0)
    assert s2["jobDeploymentStatus"] == "Suspended" and s2["jobStatus"] == ""
    assert "jobId" not in s2 and "dashboardURL" not in s2 and "rayClusterName" not in s2
    assert next_status(rj({"suspend": True}, s2), World(), T0)["jobDeploymentStatus"] == "Suspended"
    assert next_status(rj({"suspend": False}, s2), World(), T0)["jobDeploymentStatus"] == ""


def test_grace_period() -> None:
    st = {
        "jobDeploymentStatus": "Running",
        "jobStatus": "FAILED",
        "startTime": "2026-01-01T00:00:00Z",
        "rayJobInfo": {"endTime": "2026-01-01T00:00:00Z"},
    }
    out = next_status(rj(status=st), World(), T0 + timedelta(seconds=301))
    assert out["jobDeploymentStatus"] == "Failed"
    assert out["reason"] == "JobDeploymentStatusTransitionGracePeriodExceeded"


def test_writes_only_on_state_changes() -> None:
    assert status_changed({}, {"jobDeploymentStatus": "Initializing"})
    assert not status_changed(
        {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running"},
        {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "message": "new"},
    )
