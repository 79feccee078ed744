"""KubeRay's part, played against a real API server: RayJob status moved through KubeRay's own state machine.

Why a faithful model and not ad-hoc patches: the operator's contract is with what KubeRay writes, field for
field. `next_status` is one pass of KubeRay's RayJob controller (ray-project/kuberay,
ray-operator/controllers/ray/rayjob_controller.go `Reconcile`, `initRayJobStatusIfNeed`,
`checkActiveDeadlineAndUpdateStatusIfNeeded`, `checkK8sJobAndUpdateStatusIfNeeded`,
`checkTransitionGracePeriodAndUpdateStatusIfNeeded`, `checkBackoffLimitAndUpdateStatusIfNeeded`,
`updateRayJobStatus`) with the outside world (RayCluster readiness, the Ray dashboard's job info, the submitter
Job) passed in. Like KubeRay, `KubeRay.reconcile` writes the status with an update of the status subresource,
and only when `jobStatus` or `jobDeploymentStatus` changed; it adds KubeRay's finalizer on the first pass.

Values (rayjob_types.go): jobDeploymentStatus "" (New), Initializing, Running, Complete, Failed, Suspending,
Suspended, Retrying, Waiting; jobStatus "" (New), PENDING, RUNNING, STOPPED, SUCCEEDED, FAILED; reason
SubmissionFailed, DeadlineExceeded, AppFailed, JobDeploymentStatusTransitionGracePeriodExceeded. The counters
`succeeded`/`failed` count finished attempts; `startTime` is set on New -> Initializing, `endTime` when
the deployment status becomes Complete or Failed; `rayJobInfo` holds the Ray job's own start/end times.

backoffLimit (`checkBackoffLimitAndUpdateStatusIfNeeded`, rayjob_controller.go at ray-project/kuberay
feeaf72f, lines 516-557): every pass counts a Failed deployment into `status.failed`; while `failed <
backoffLimit + 1` a Failed job becomes Retrying, unless its reason is DeadlineExceeded or
JobStatusCheckTimeoutExceeded. Retrying deletes the RayCluster and submitter and resets the status to New
(the `JobDeploymentStatusSuspending, JobDeploymentStatusRetrying` case, lines 366-409), so the next attempt
runs on a fresh cluster. `OfflineRayJob` runs the same passes on a RayJob held in memory (`kubetune run`, which
has no API server).

What is not modelled: RayCluster/submitter objects themselves (no pods run here), cron schedules, interactive
mode, deletion strategies. Tests call the transitions explicitly (`start`, `succeed`, `fail`, ...), each one or
more reconcile passes, exactly as KubeRay would make them.
"""

from __future__ import annotations

import copy
import random
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any, cast

from kubetune import kubeclient
from kubetune.clock import parse_rfc3339 as _parse
from kubetune.clock import rfc3339

FINALIZER = "ray.io/rayjob-finalizer"
TERMINAL_JOB_STATUSES = ("STOPPED", "SUCCEEDED", "FAILED")
# Failures KubeRay never retries, whatever backoffLimit says (checkBackoffLimitAndUpdateStatusIfNeeded).
NOT_RETRIED_REASONS = ("DeadlineExceeded", "JobStatusCheckTimeoutExceeded")
DEFAULT_GRACE_PERIOD_S = 300  # DEFAULT_RAYJOB_DEPLOYMENT_STATUS_TRANSITION_GRACE_PERIOD_SECONDS
_RAND_ALPHABET = "bcdfghjklmnpqrstvwxz2456789"  # k8s.io/apimachinery/pkg/util/rand


def _rand(n: int = 5) -> str:
    return "".join(random.choice(_RAND_ALPHABET) for _ in range(n))


@dataclass(frozen=True)
class JobInfo:
    """What Ray's dashboard says about the job (`RayJobInfo` in dashboard_httpclient, the part KubeRay uses)."""

    status: str  # PENDING, RUNNING, SUCCEEDED, FAILED, STOPPED
    message: str = ""
    start_time: datetime | None = None
    end_time: datetime | None = None


@dataclass(frozen=True)
class World:
    """What KubeRay observes outside the RayJob during one reconcile pass."""

    cluster_ready: bool = True
    job: JobInfo | None = None
    submitter_failed: tuple[str, str] | None = None  # (condition reason, message) of the failed submitter Job
    submitter_finished: bool = True


def next_status(
    ray_job: dict[str, Any], world: World, now: datetime, grace_period_s: int = DEFAULT_GRACE_PERIOD_S
) -> dict[str, Any]:
    """The RayJob's status after one KubeRay reconcile pass (a new dict; the input is not changed)."""
    spec = ray_job.get("spec") or {}
    st: dict[str, Any] = copy.deepcopy(ray_job.get("status") or {})
    name = ray_job["metadata"]["name"]
    jds = st.get("jobDeploymentStatus", "")

    def deadline_passed() -> bool:
        ads = spec.get("activeDeadlineSeconds")
        return (
            ads is not None
            and st.get("startTime") is not None
            and now >= _parse(st["startTime"]) + timedelta(seconds=int(ads))
        )

    def to_suspending() -> bool:
        if spec.get("suspend") and jds in ("Running", "Initializing"):
            st["jobDeploymentStatus"] = "Suspending"
            return True
        return False

    def to_deadline_failed() -> bool:
        if not deadline_passed():
            return False
        st["jobDeploymentStatus"] = "Failed"
        st["reason"] = "DeadlineExceeded"
        st["message"] = (
            f"The RayJob has passed the activeDeadlineSeconds. StartTime: {st['startTime']}. "
            f"ActiveDeadlineSeconds: {spec['activeDeadlineSeconds']}"
        )
        return True

    if jds == "":
        # initRayJobStatusIfNeed
        if not st.get("jobId") or not st.get("rayClusterName") or not st.get("jobStatus"):
            if not st.get("jobId"):
                st["jobId"] = spec.get("jobId") or f"{name}-{_rand()}"
            if not st.get("rayClusterName"):
                st["rayClusterName"] = f"{name}-raycluster-{_rand()}"
            st.setdefault("jobStatus", "")
            st["jobDeploymentStatus"] = "Initializing"
            st["startTime"] = rfc3339(now)
    elif jds == "Initializing":
        if not (to_suspending() or to_deadline_failed()):
            if not st.get("dashboardURL"):
                if not world.cluster_ready:
                    return st  # requeue: wait for the RayCluster to be ready
                cluster = st.get("rayClusterName", "")
                namespace = ray_job["metadata"].get("namespace", "default")
                st["dashboardURL"] = f"{cluster}-head-svc.{namespace}.svc.cluster.local:8265"
            st["jobDeploymentStatus"] = "Running"
    elif jds == "Running":
        if not (to_suspending() or to_deadline_failed() or _grace_period_exceeded(st, now, grace_period_s)):
            if world.submitter_failed is not None:
                st["jobDeploymentStatus"] = "Failed"
                if st.get("jobStatus") == "FAILED":
                    st["reason"] = "AppFailed"
                else:
                    reason, message = world.submitter_failed
                    st["reason"] = "SubmissionFailed"
                    st["message"] = f"Job submission has failed. Reason: {reason}. Message: {message}"
            elif world.job is not None:
                info = world.job
                new_jds, reason = "Running", ""
                if info.status in TERMINAL_JOB_STATUSES and world.submitter_finished:
                    new_jds = "Complete"
                    if info.status == "FAILED":
                        new_jds, reason = "Failed", "AppFailed"
                st["jobStatus"] = info.status
                st["jobDeploymentStatus"] = new_jds
                st["reason"] = reason
                st["message"] = info.message
                job_info = st.setdefault("rayJobInfo", {})
                if info.start_time is not None:
                    job_info["startTime"] = rfc3339(info.start_time)
                if info.end_time is not None:
                    job_info["endTime"] = rfc3339(info.end_time)
    elif jds in ("Suspending", "Retrying"):
        # Cluster and submitter deleted (nothing runs here); reset atomically.
        for key in ("rayClusterName", "dashboardURL", "jobId", "message", "reason"):
            st.pop(key, None)  # zero values, omitted by KubeRay's omitempty
        st["rayClusterStatus"], st["rayJobInfo"] = {}, {}  # Go serialises empty structs as {}
        st["jobStatus"] = ""
        st["jobDeploymentStatus"] = "Suspended" if jds == "Suspending" else ""
    elif jds == "Suspended":
        if not spec.get("suspend"):
            st["jobStatus"] = ""
            st["jobDeploymentStatus"] = ""
    elif jds in ("Complete", "Failed"):
        pass  # cluster deletion after ttlSecondsAfterFinished; the status does not change

    # checkBackoffLimitAndUpdateStatusIfNeeded
    failed = int(st.get("failed") or 0) + (1 if st.get("jobDeploymentStatus") == "Failed" else 0)
    succeeded = int(st.get("succeeded") or 0) + (
        1 if st.get("jobStatus") == "SUCCEEDED" and st.get("jobDeploymentStatus") == "Complete" else 0
    )
    st["failed"], st["succeeded"] = failed, succeeded
    limit = spec.get("backoffLimit")
    if (
        st.get("jobDeploymentStatus") == "Failed"
        and limit is not None
        and failed < int(limit) + 1
        and st.get("reason") not in NOT_RETRIED_REASONS
    ):
        st["jobDeploymentStatus"] = "Retrying"

    # updateRayJobStatus: endTime on the way into Complete/Failed
    old = ray_job.get("status") or {}
    if (old.get("jobStatus", ""), old.get("jobDeploymentStatus", "")) != (
        st.get("jobStatus", ""),
        st.get("jobDeploymentStatus", ""),
    ) and st.get("jobDeploymentStatus") in ("Complete", "Failed"):
        st["endTime"] = rfc3339(now)
    return st


def _grace_period_exceeded(st: dict[str, Any], now: datetime, grace_period_s: int) -> bool:
    if st.get("jobStatus") not in TERMINAL_JOB_STATUSES:
        return False
    end = (st.get("rayJobInfo") or {}).get("endTime")
    if end is None or now < _parse(end) + timedelta(seconds=grace_period_s):
        return False
    st["jobDeploymentStatus"] = "Failed" if st.get("jobStatus") == "FAILED" else "Complete"
    st["reason"] = "JobDeploymentStatusTransitionGracePeriodExceeded"
    st["message"] = (
        "JobDeploymentStatus does not transition to Complete or Failed within the grace period after "
        "JobStatus reaches a terminal state."
    )
    return True


def _omit_empty(status: dict[str, Any]) -> dict[str, Any]:
    """KubeRay's status strings are `omitempty`: "" (e.g. the New jobStatus) is not sent at all."""
    return {k: v for k, v in status.items() if v != ""}


def status_changed(before: dict[str, Any] | None, after: dict[str, Any]) -> bool:
    """KubeRay writes the status only when jobStatus or jobDeploymentStatus changed."""
    b = before or {}
    return (b.get("jobStatus", ""), b.get("jobDeploymentStatus", "")) != (
        after.get("jobStatus", ""),
        after.get("jobDeploymentStatus", ""),
    )


class OfflineRayJob:
    """A RayJob held in memory and moved through `next_status`, for runs without an API server (`kubetune run`).

    The caller plays the world (cluster readiness, the Ray job's end) and asks what KubeRay would do next:
    `attempt_ended` says whether the job is Retrying (a fresh cluster is due: call `retry`) or final."""

    def __init__(self, ray_job: dict[str, Any], clock: Any = None) -> None:
        self.obj = copy.deepcopy(ray_job)
        self.obj["status"] = dict(self.obj.get("status") or {})
        self._clock = clock or (lambda: datetime.now(UTC))

    @property
    def status(self) -> dict[str, Any]:
        return cast("dict[str, Any]", self.obj["status"])

    def reconcile(self, world: World | None = None) -> str:
        """One KubeRay pass; returns the new jobDeploymentStatus."""
        self.obj["status"] = next_status(self.obj, world or World(), self._clock())
        return cast(str, self.status.get("jobDeploymentStatus", ""))

    def start(self) -> str:
        """New -> Initializing -> Running (the caller has started the cluster)."""
        if not self.status.get("jobDeploymentStatus"):
            self.reconcile()
        return self.reconcile(World(cluster_ready=True))

    def attempt_ended(self, succeeded: bool, message: str, start: datetime, end: datetime) -> str:
        """The Ray job ended: Complete, Failed (final) or Retrying (backoffLimit left)."""
        info = JobInfo("SUCCEEDED" if succeeded else "FAILED", message=message, start_time=start, end_time=end)
        return self.reconcile(World(job=info))

    def retry(self) -> str:
        """Retrying -> New: the cluster and submitter are gone; the next attempt starts from scratch."""
        return self.reconcile()


class KubeRay:
    """Drives RayJobs in a real API server the way KubeRay's controller would."""

    def __init__(self, kubeconfig: str | Path, *, clock: Any = None):
        self._api = kubeclient.api_client(kubeconfig)
        self._clock = clock or (lambda: datetime.now(UTC))

    def close(self) -> None:
        self._api.close()

    def __enter__(self) -> KubeRay:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- REST -------------------------------------------------------------------------------------------

    def _path(self, namespace: str, name: str, sub: str = "") -> str:
        return f"/apis/ray.io/v1/namespaces/{namespace}/rayjobs/{name}" + (f"/{sub}" if sub else "")

    def _call(self, method: str, path: str, body: Any = None, content_type: str = "application/json") -> dict[str, Any]:
        return kubeclient.call_json(self._api, method, path, body, content_type=content_type)

    def get(self, namespace: str, name: str) -> dict[str, Any]:
        return self._call("GET", self._path(namespace, name))

    def set_suspend(self, namespace: str, name: str, suspend: bool) -> dict[str, Any]:
        """What Kueue (or a user) does to a RayJob's spec.suspend."""
        return self._call(
            "PATCH", self._path(namespace, name), {"spec": {"suspend": suspend}}, "application/merge-patch+json"
        )

    # --- one reconcile pass -------------------------------------------------------------------------------

    def reconcile(
        self, namespace: str, name: str, world: World | None = None, *, now: datetime | None = None
    ) -> dict[str, Any]:
        """One KubeRay reconcile pass; returns the RayJob as stored afterwards."""
        ray_job = self.get(namespace, name)
        if not (ray_job.get("status") or {}).get("jobDeploymentStatus") and FINALIZER not in (
            ray_job["metadata"].get("finalizers") or []
        ):
            ray_job["metadata"]["finalizers"] = [*(ray_job["metadata"].get("finalizers") or []), FINALIZER]
            ray_job = self._call("PUT", self._path(namespace, name), ray_job)
        new = next_status(ray_job, world or World(), now or self._clock())
        if status_changed(ray_job.get("status"), new):
            ray_job["status"] = _omit_empty(new)
            ray_job = self._call("PUT", self._path(namespace, name, "status"), ray_job)
        return ray_job

    # --- transitions tests ask for ------------------------------------------------------------------------

    def initialize(self, namespace: str, name: str) -> dict[str, Any]:
        """New -> Initializing (jobId, rayClusterName, startTime)."""
        return self._expect(self.reconcile(namespace, name), "Initializing")

    def start(self, namespace: str, name: str) -> dict[str, Any]:
        """New -> Initializing -> Running (cluster ready, dashboardURL) -> jobStatus PENDING -> RUNNING."""
        rj = self.get(namespace, name)
        if not (rj.get("status") or {}).get("jobDeploymentStatus"):
            self.initialize(namespace, name)
        self._expect(self.reconcile(namespace, name, World(cluster_ready=True)), "Running")
        self.reconcile(namespace, name, World(job=JobInfo("PENDING")))
        now = self._clock()
        return self._expect(
            self.reconcile(namespace, name, World(job=JobInfo("RUNNING", start_time=now))), "Running", "RUNNING"
        )

    def succeed(self, namespace: str, name: str, message: str = "Job finished successfully.") -> dict[str, Any]:
        now = self._clock()
        info = JobInfo("SUCCEEDED", message=message, start_time=now - timedelta(seconds=1), end_time=now)
        return self._expect(self.reconcile(namespace, name, World(job=info)), "Complete", "SUCCEEDED")

    def fail(
        self, namespace: str, name: str, message: str = "Job entrypoint command failed with exit code 1"
    ) -> dict[str, Any]:
        """The Ray job fails (AppFailed); with backoffLimit left, KubeRay goes Retrying instead."""
        now = self._clock()
        info = JobInfo("FAILED", message=message, start_time=now - timedelta(seconds=1), end_time=now)
        return self.reconcile(namespace, name, World(job=info))

    def fail_submission(
        self,
        namespace: str,
        name: str,
        reason: str = "BackoffLimitExceeded",
        message: str = "Job has reached the specified backoff limit",
    ) -> dict[str, Any]:
        return self.reconcile(namespace, name, World(submitter_failed=(reason, message)))

    def pass_deadline(self, namespace: str, name: str) -> dict[str, Any]:
        """Reconcile at startTime + activeDeadlineSeconds: Failed with reason DeadlineExceeded."""
        rj = self.get(namespace, name)
        start = _parse(rj["status"]["startTime"])
        when = start + timedelta(seconds=int(rj["spec"]["activeDeadlineSeconds"]))
        return self._expect(self.reconcile(namespace, name, World(job=JobInfo("RUNNING")), now=when), "Failed")

    def suspend(self, namespace: str, name: str) -> dict[str, Any]:
        """With spec.suspend true: Running/Initializing -> Suspending -> Suspended."""
        self._expect(self.reconcile(namespace, name), "Suspending")
        return self._expect(self.reconcile(namespace, name), "Suspended")

    def resume(self, namespace: str, name: str) -> dict[str, Any]:
        """With spec.suspend false: Suspended -> New, then on to Running."""
        self.reconcile(namespace, name)
        return self.start(namespace, name)

    def retry(self, namespace: str, name: str) -> dict[str, Any]:
        """Retrying -> New (cluster and submitter deleted)."""
        return self.reconcile(namespace, name)

    def remove_finalizer(self, namespace: str, name: str) -> None:
        """What KubeRay does for a RayJob being deleted (after trying to stop the Ray job)."""
        rj = self.get(namespace, name)
        finalizers = [f for f in rj["metadata"].get("finalizers") or [] if f != FINALIZER]
        self._call(
            "PATCH",
            self._path(namespace, name),
            {"metadata": {"finalizers": finalizers or None}},
            "application/merge-patch+json",
        )

    @staticmethod
    def _expect(ray_job: dict[str, Any], jds: str, js: str | None = None) -> dict[str, Any]:
        st = ray_job.get("status") or {}
        if st.get("jobDeploymentStatus") != jds or (js is not None and st.get("jobStatus") != js):
            raise AssertionError(
                f"RayJob {ray_job['metadata']['name']}: expected {jds}/{js}, got "
                f"{st.get('jobDeploymentStatus')}/{st.get('jobStatus')}"
            )
        return ray_job
