"""Recovery rules without servers: KubeRay's backoffLimit as `kubetune run` follows it, the cause of a restart,
S3 outage retries, and the trainer's FailureConfig."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

import pytest
from botocore.exceptions import ClientError, EndpointConnectionError

from kubetune import api
from kubetune_cli.localenv import kuberay
from kubetune_trainer import restarts
from kubetune_trainer.data import s3 as s3_lib

pytestmark = pytest.mark.unit

T0 = datetime(2026, 1, 1, tzinfo=UTC)


def _ray_job(backoff_limit: int | None) -> dict:
    spec = {"entrypoint": "python -m kubetune_trainer"}
    if backoff_limit is not None:
        spec["backoffLimit"] = backoff_limit
    return {"metadata": {"name": "j", "namespace": "ns"}, "spec": spec}


def _attempts(backoff_limit: int | None, outcomes: list[bool]) -> list[str]:
    """jobDeploymentStatus after each attempt's end, walking KubeRay's passes as `kubetune run` does."""
    job = kuberay.OfflineRayJob(_ray_job(backoff_limit), clock=lambda: T0)
    seen = []
    for ok in outcomes:
        assert job.start() == "Running"
        jds = job.attempt_ended(ok, "" if ok else "exit 1", T0, T0 + timedelta(seconds=5))
        seen.append(jds)
        if jds != "Retrying":
            break
        assert job.retry() == ""  # New: cluster and submitter gone, the next attempt starts afresh
    return seen


def test_backoff_limit_retries_failed_attempts_like_kuberay() -> None:
    assert _attempts(2, [False, False, True]) == ["Retrying", "Retrying", "Complete"]
    assert _attempts(2, [False, False, False]) == ["Retrying", "Retrying", "Failed"]  # 3 = backoffLimit + 1
    assert _attempts(0, [False]) == ["Failed"]
    assert _attempts(None, [False]) == ["Failed"]  # unset: KubeRay never retries
    assert _attempts(1, [True]) == ["Complete"]


def test_backoff_limit_counts_failures_and_skips_deadline_failures() -> None:
    job = kuberay.OfflineRayJob(_ray_job(3), clock=lambda: T0)
    job.start()
    job.attempt_ended(False, "boom", T0, T0)
    assert job.status["failed"] == 1 and job.status["succeeded"] == 0
    st = kuberay.next_status(
        {
            **_ray_job(3),
            "status": {"jobDeploymentStatus": "Running", "jobStatus": "RUNNING", "startTime": kuberay.rfc3339(T0)},
            "spec": {**_ray_job(3)["spec"], "activeDeadlineSeconds": 10},
        },
        kuberay.World(),
        T0 + timedelta(seconds=11),
    )
    assert (st["jobDeploymentStatus"], st["reason"]) == ("Failed", "DeadlineExceeded")  # never retried


def test_restart_cause() -> None:
    assert restarts.classify({}, "d1") is None  # the run's first start
    assert restarts.classify({"starts": 1, "driver": "d1"}, "d1")[0] == "WorkerFailed"
    assert restarts.classify({"starts": 1, "driver": "d1"}, "d2")[0] == "JobRetried"
    assert restarts.classify({"starts": 2, "driver": "d1", "preempted": True}, "d1")[0] == "NodePreempted"
    assert restarts.classify({"starts": 2, "driver": "d1", "preempted": True}, "d2")[0] == "NodePreempted"


def test_retrying_waits_out_an_outage_and_not_other_errors() -> None:
    calls = []

    def flaky() -> str:
        calls.append(1)
        if len(calls) < 3:
            raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")
        return "ok"

    assert s3_lib.retrying("test", flaky, budget_s=10) == "ok" and len(calls) == 3
    denied = ClientError({"Error": {"Code": "AccessDenied"}, "ResponseMetadata": {"HTTPStatusCode": 403}}, "Get")
    n = []

    def refuse() -> None:
        n.append(1)
        raise denied

    with pytest.raises(ClientError):
        s3_lib.retrying("test", refuse, budget_s=10)
    assert len(n) == 1  # a refusal is not an outage: no retry

    def down() -> None:
        raise EndpointConnectionError(endpoint_url="http://127.0.0.1:1")

    with pytest.raises(EndpointConnectionError):
        s3_lib.retrying("test", down, budget_s=1.0)  # the budget ends the wait


def test_failure_config_from_the_spec() -> None:
    from kubetune_trainer.train import failure_config

    spec = api.parse_spec(
        {
            "model": {"uri": "s3://bkt/m"},
            "dataset": {"train": "s3://bkt/d", "format": "completion"},
            "output": {"uri": "s3://bkt/o"},
            "training": {"maxWorkerRestarts": 5},
        }
    )
    fc = failure_config(api.resolve_trainer_config("j", "ns", "u1", spec))
    assert (fc.max_failures, fc.max_preemption_failures) == (5, 10)
    assert api.TrainingSpec().max_worker_restarts == 3  # the default recovers a lost worker
