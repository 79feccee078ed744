"""From what the operator observed to the FineTuneJob's status: pure functions, no API calls.

Ownership of `status` (both write through the status subresource with JSON merge patches of their own keys):
- the operator owns `observedGeneration`, `state`, `conditions`, `rayJob`, `startTime`, `completionTime`,
  `specHash` (and, with serving, `endpoint`);
- the trainer owns `progress`, `data`, `checkpoints`, `trials`, `bestTrial`, `evaluation`, `model`.
`status_patch` only ever names operator-owned keys, and only those whose value changed, so a status write can
never clobber what the trainer reported, and an unchanged status costs no request.

How KubeRay's RayJob status maps (jobDeploymentStatus / jobStatus, as KubeRay's rayjob_controller writes them):

| RayJob                                  | Training           | Succeeded | Failed                    | Suspended |
|-----------------------------------------|--------------------|-----------|---------------------------|-----------|
| no status yet ("" = New)                | False Pending      | False     | False                     | False     |
| Initializing                            | False Initializing | False     | False                     | False     |
| Running + PENDING/""                    | True JobPending    | False     | False                     | False     |
| Running + RUNNING                       | True Running       | False     | False                     | False     |
| Running + a terminal jobStatus          | True Finishing     | False     | False                     | False     |
| Retrying, or New/Initializing, failed>0 | True Retrying      | False     | False                     | False     |
| Suspending / Suspended                  | False Suspending.. | False     | False                     | True      |
| Complete + SUCCEEDED                    | False JobSucceeded | True      | False                     | False     |
| Complete + STOPPED                      | False Stopped      | False     | True Stopped              | False     |
| Failed (or Complete + FAILED)           | False <reason>     | False     | True <KubeRay's reason>   | False     |
"""

from __future__ import annotations

import copy
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune.clock import now_rfc3339 as now_rfc3339  # re-exported: reconcile.py stamps statuses with it
from kubetune_operator import conditions as c

OWNED_KEYS = (
    "observedGeneration",
    "state",
    "conditions",
    "rayJob",
    "startTime",
    "completionTime",
    "specHash",
    "endpoint",
)
KEEP = object()  # "leave as it is" marker for Observation fields


@dataclass(frozen=True)
class Phase:
    """Where a run is, as one reason and message shared by the run conditions."""

    reason: str
    message: str
    training: bool = False
    succeeded: bool = False
    failed: bool = False
    suspended: bool = False


def phase_of(ray_job: Mapping[str, Any] | None) -> Phase:
    """The phase of a RayJob as KubeRay reports it."""
    if ray_job is None:
        return Phase(c.PENDING, "creating the RayJob")
    name = ray_job.get("metadata", {}).get("name", "")
    st = ray_job.get("status") or {}
    jds = st.get("jobDeploymentStatus") or ""
    js = st.get("jobStatus") or ""
    job_id = st.get("jobId") or ""
    failed_count = int(st.get("failed") or 0)
    kuberay_reason = st.get("reason") or ""
    kuberay_message = st.get("message") or ""
    cluster = st.get("rayClusterName") or ""

    if jds in ("", "New", "Initializing", "Waiting", "Scheduling", "Scheduled") and failed_count > 0:
        return Phase(c.RETRYING, f"attempt {failed_count} failed; KubeRay is retrying (RayJob {name})", training=True)
    if jds in ("", "New", "Scheduling", "Scheduled"):
        return Phase(c.PENDING, f"RayJob {name} created; waiting for KubeRay")
    if jds in ("Initializing", "Waiting"):
        where = f"RayCluster {cluster}" if cluster else "the RayCluster"
        return Phase(c.INITIALIZING, f"KubeRay is starting {where}")
    if jds == "Running":
        if js in ("", "PENDING"):
            return Phase(c.JOB_PENDING, f"Ray job {job_id} submitted; waiting for it to start", training=True)
        if js == "RUNNING":
            return Phase(c.RUNNING, f"Ray job {job_id} is running", training=True)
        return Phase(c.FINISHING, f"Ray job {job_id} ended ({js}); KubeRay is completing the RayJob", training=True)
    if jds == "Retrying":
        return Phase(
            c.RETRYING, f"attempt {max(failed_count, 1)} failed; KubeRay is retrying (RayJob {name})", training=True
        )
    if jds == "Suspending":
        return Phase(c.SUSPENDING, f"KubeRay is suspending RayJob {name}", suspended=True)
    if jds == "Suspended":
        return Phase(c.SUSPENDED_REASON, f"RayJob {name} is suspended; its RayCluster is deleted", suspended=True)
    if jds == "Complete":
        if js == "SUCCEEDED":
            return Phase(c.JOB_SUCCEEDED, f"Ray job {job_id} succeeded", succeeded=True)
        if js == "FAILED":
            return Phase(
                c.failure_reason(kuberay_message, c.APP_FAILED),
                kuberay_message or f"Ray job {job_id} failed",
                failed=True,
            )
        return Phase(c.STOPPED, kuberay_message or f"Ray job {job_id} was stopped ({js or 'no status'})", failed=True)
    if jds == "Failed":
        return Phase(
            c.failure_reason(kuberay_message, kuberay_reason or c.RAYJOB_FAILED),
            kuberay_message or f"RayJob {name} failed",
            failed=True,
        )
    return Phase(c.PENDING, f"RayJob {name} is in an unknown deployment status {jds!r}")


@dataclass
class Observation:
    """What one reconcile pass found; fields left at KEEP do not change the status."""

    generation: int | None = None  # set when this pass reconciled the spec of that generation
    spec_errors: list[tuple[str, str]] | None | object = KEEP  # None: valid; [...]: invalid
    ray_job_name: str = ""
    ray_job: Mapping[str, Any] | None | object = KEEP  # the RayJob object; None: absent
    ray_job_deleted: bool = False  # it existed and is gone
    rejected_fields: list[str] | None | object = KEEP  # [...]: rejected; []: matches the run
    rejection_message: str = ""
    failure: tuple[str, str] | None = None  # (reason, message) when making the RayJob failed for good
    extra_conditions: list[tuple[str, str, str, str]] = field(default_factory=list)  # for later steps
    endpoint: Mapping[str, Any] | None | object = KEEP  # status.endpoint {url, model}; None: remove it


def _run_phase(current: Mapping[str, Any], obs: Observation) -> Phase | None:
    """The run's phase, or None to leave the run conditions alone."""
    conds = current.get("conditions") or []
    finished = c.is_true(conds, c.SUCCEEDED) or (
        c.is_true(conds, c.FAILED) and (c.get(conds, c.FAILED) or {}).get("reason") != c.INVALID
    )
    if obs.ray_job is KEEP:
        return None
    if obs.ray_job is None:
        if obs.ray_job_deleted:
            if finished:
                return None  # a finished run's record stays as it was
            return Phase(
                c.RAYJOB_DELETED, f"RayJob {obs.ray_job_name} was deleted before the run finished", failed=True
            )
        errors = obs.spec_errors if isinstance(obs.spec_errors, list) else None
        if obs.failure is not None:
            return Phase(obs.failure[0], obs.failure[1], failed=True)
        if errors:
            return Phase(c.INVALID, _errors_message(errors), failed=True)
        return phase_of(None)
    return phase_of(obs.ray_job if isinstance(obs.ray_job, Mapping) else None)


def _errors_message(errors: list[tuple[str, str]]) -> str:
    return "; ".join(f"{p}: {m}" for p, m in errors)


def state_of(conditions: Sequence[Mapping[str, Any]]) -> str:
    """The one-word summary shown by `kubectl get ftj`."""
    if c.is_true(conditions, c.FAILED):
        return "Failed"
    if c.is_true(conditions, c.SUCCEEDED):
        deployed = c.get(conditions, c.DEPLOYED)
        if deployed is None or (
            deployed.get("status") != c.TRUE and deployed.get("reason") in c.NOT_SERVING_ON_PURPOSE
        ):
            return "Succeeded"
        return "Deployed" if deployed.get("status") == c.TRUE else "Deploying"
    if c.is_true(conditions, c.SUSPENDED):
        return "Suspended"
    if c.is_true(conditions, c.TRAINING):
        return "Training"
    return "Pending"


def desired_status(current: Mapping[str, Any] | None, obs: Observation, now: str) -> dict[str, Any]:
    """The operator-owned part of the status after this observation."""
    cur = dict(current or {})
    out: dict[str, Any] = {k: copy.deepcopy(cur[k]) for k in OWNED_KEYS if k in cur}
    generation = obs.generation if obs.generation is not None else cur.get("observedGeneration")
    if obs.generation is not None:
        out["observedGeneration"] = obs.generation
    conds: list[dict[str, Any]] = list(out.get("conditions") or [])

    def put(type_: str, status: str, reason: str, message: str) -> None:
        nonlocal conds
        conds = c.set_condition(conds, type_, status, reason, message, now=now, generation=generation)

    if obs.spec_errors is not KEEP:
        errors = obs.spec_errors if isinstance(obs.spec_errors, list) else None
        if errors:
            put(c.VALIDATED, c.FALSE, c.INVALID, _errors_message(errors))
        else:
            put(c.VALIDATED, c.TRUE, c.VALID, "the spec passed every check")

    if obs.rejected_fields is not KEEP:
        if obs.rejected_fields:
            put(c.SPEC_CHANGE_REJECTED, c.TRUE, c.TRAINING_FIELDS_IMMUTABLE, obs.rejection_message)
        elif c.get(conds, c.SPEC_CHANGE_REJECTED) is not None:
            put(c.SPEC_CHANGE_REJECTED, c.FALSE, c.SPEC_MATCHES_RUN, "the training fields match the running job")

    phase = _run_phase(cur, obs)
    if phase is not None:
        put(c.TRAINING, c.TRUE if phase.training else c.FALSE, phase.reason, phase.message)
        put(c.SUSPENDED, c.TRUE if phase.suspended else c.FALSE, phase.reason, phase.message)
        put(c.SUCCEEDED, c.TRUE if phase.succeeded else c.FALSE, phase.reason, phase.message)
        put(c.FAILED, c.TRUE if phase.failed else c.FALSE, phase.reason, phase.message)
        if (phase.succeeded or phase.failed) and not out.get("completionTime"):
            end = (_ray_status(obs).get("endTime")) if isinstance(obs.ray_job, Mapping) else None
            out["completionTime"] = end or now
        if not (phase.succeeded or phase.failed) and out.get("completionTime") and obs.ray_job is not None:
            out.pop("completionTime")  # a retry after a failure (cannot happen today; keeps status honest)

    for type_, status, reason, message in obs.extra_conditions:
        put(type_, status, reason, message)

    if obs.endpoint is None:
        out.pop("endpoint", None)
    elif isinstance(obs.endpoint, Mapping):
        out["endpoint"] = dict(obs.endpoint)

    if isinstance(obs.ray_job, Mapping):
        st = _ray_status(obs)
        ray: dict[str, Any] = {"name": obs.ray_job.get("metadata", {}).get("name") or obs.ray_job_name}
        for key in ("jobId", "dashboardURL", "jobStatus", "jobDeploymentStatus"):
            if st.get(key):
                ray[key] = st[key]
        out["rayJob"] = ray
        if st.get("startTime") and not out.get("startTime"):
            out["startTime"] = st["startTime"]
        applied = (obs.ray_job.get("metadata", {}).get("annotations") or {}).get("kubetune.io/spec-hash")
        if applied:
            out["specHash"] = applied

    out["conditions"] = conds
    out["state"] = state_of(conds)
    return out


def _ray_status(obs: Observation) -> Mapping[str, Any]:
    status: Mapping[str, Any] = (obs.ray_job.get("status") or {}) if isinstance(obs.ray_job, Mapping) else {}
    return status


def status_patch(current: Mapping[str, Any] | None, desired: Mapping[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386) for the owned keys that differ; {} when nothing changed."""
    cur = current or {}
    patch: dict[str, Any] = {}
    for key in OWNED_KEYS:
        if key in desired:
            diff = _merge_diff(cur.get(key), desired[key])
            if diff is not _SAME:
                patch[key] = diff
        elif cur.get(key) is not None:
            patch[key] = None
    return patch


_SAME = object()


def _merge_diff(old: Any, new: Any) -> Any:
    if old == new:
        return _SAME
    if isinstance(old, dict) and isinstance(new, dict):
        out: dict[str, Any] = {}
        for k in set(old) | set(new):
            if k not in new:
                out[k] = None
            else:
                d = _merge_diff(old.get(k), new[k])
                if d is not _SAME:
                    out[k] = d
        return out
    return new  # scalars and lists are replaced whole


@dataclass(frozen=True)
class EventSpec:
    type: str  # Normal or Warning
    reason: str
    message: str


def transition_events(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> list[EventSpec]:
    """One Event per transition: the run's phase, validation, spec-change rejection, and serving."""
    old = list((before or {}).get("conditions") or [])
    new = list(after.get("conditions") or [])
    events: list[EventSpec] = []

    def changed(type_: str) -> Mapping[str, Any] | None:
        a, b = c.get(old, type_), c.get(new, type_)
        if b is None:
            return None
        if a is None or (a.get("status"), a.get("reason")) != (b.get("status"), b.get("reason")):
            return b
        return None

    v = changed(c.VALIDATED)
    if v is not None and v["status"] == c.FALSE:
        events.append(EventSpec("Warning", c.INVALID, v["message"]))
    r = changed(c.SPEC_CHANGE_REJECTED)
    if r is not None:
        if r["status"] == c.TRUE:
            events.append(EventSpec("Warning", "SpecChangeRejected", r["message"]))
        elif c.get(old, c.SPEC_CHANGE_REJECTED) is not None:
            events.append(EventSpec("Normal", "SpecChangeReverted", r["message"]))
    t = changed(c.TRAINING)
    failed = c.get(new, c.FAILED)
    if t is not None and not (failed and failed.get("status") == c.TRUE and failed.get("reason") == c.INVALID):
        warning = failed is not None and failed.get("status") == c.TRUE
        events.append(EventSpec("Warning" if warning else "Normal", t["reason"], t["message"]))
    d = changed(c.DEPLOYED)
    if d is not None:
        calm = d["status"] == c.TRUE or d.get("reason") in (
            *c.NOT_SERVING_ON_PURPOSE,
            c.PROGRESSING,
            c.AWAITING_EVALUATION,
        )
        reason = "Deployed" if d["status"] == c.TRUE else d.get("reason") or "NotDeployed"
        events.append(EventSpec("Normal" if calm else "Warning", reason, d.get("message", "")))
    return events
