"""Reconciling one FineTuneJob: a short list of steps, then one status write.

A pass reads the job fresh, runs its steps (each fills in what it observed), and ends in `write_status`, the
only place the operator writes a job's status: it computes the operator-owned status from the observations
(`status.desired_status`), sends a merge patch only of what changed, and posts one Event per transition.

Two kinds of pass, both under a per-job lock so that they never interleave for the same job:
- `reconcile` (the job's spec was created, changed, or the operator restarted): validate, make sure the
  training objects exist (create-or-get, never a second copy), apply the spec-change policy, then status;
- `on_ray_job` (KubeRay changed the RayJob): status only.
- `on_deployment` (the inference Deployment's status moved), `on_job_event` (the trainer reported its model
  or evaluation after the run), `serve` (a requeued retry): status passes.

Serving (`kubetune_operator.reconcile_deploy.ensure_serving`) is the last step of both kinds of pass: once `Succeeded`
is True it keeps the inference Deployment and Service as `spec.deploy` asks and reports `Deployed` and
`status.endpoint`. kopf retries a failed spec pass; a status pass that hit an API error is requeued here
(`_requeue`, in memory, cancelled by `close`).
"""

from __future__ import annotations

import json
import logging
import re
import threading
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from kubetune import api
from kubetune_operator import builders, guards, history, metrics, names, policy, reconcile_deploy
from kubetune_operator import conditions as c
from kubetune_operator.builders.config import applied_spec
from kubetune_operator.builders.rayjob import live_patch
from kubetune_operator.jobindex import LiveJobs
from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kube, KubeError, NotOwned, check_owned
from kubetune_operator.meta import ANNOTATION_SPEC_HASH, Owner
from kubetune_operator.settings import Settings
from kubetune_operator.status import KEEP, Observation, desired_status, now_rfc3339, status_patch, transition_events

log = logging.getLogger(__name__)


class Invalid(Exception):
    """The spec is invalid; the status says why. Not worth retrying until the spec changes."""


class Retry(Exception):
    """Something outside the job is not ready (e.g. KubeRay's CRD); try again after `delay` seconds."""

    def __init__(self, message: str, delay: float):
        super().__init__(message)
        self.delay = delay


@dataclass
class Context:
    kube: Kube
    settings: Settings
    body: dict[str, Any]
    owner: Owner
    raw_spec: dict[str, Any]
    spec: api.FineTuneJobSpec | None = None
    errors: list[tuple[str, str]] = field(default_factory=list)
    obs: Observation = field(default_factory=Observation)
    created: list[str] = field(default_factory=list)
    live_jobs: LiveJobs | None = None  # the operator's index of live jobs (None: the guard lists them)

    @property
    def status(self) -> dict[str, Any]:
        return self.body.get("status") or {}


Step = Callable[[Context], None]


# --------------------------------------------------------------------------------------------- steps


def validate(ctx: Context) -> None:
    """Parse the spec through the API models; the errors name each bad field."""
    errors: list[tuple[str, str]] = []
    if not re.match(api.DNS_LABEL_PATTERN, ctx.owner.name) or len(ctx.owner.name) > 63:
        errors.append(("metadata.name", "must be a DNS label (lowercase letters, digits, '-'; at most 63)"))
    try:
        ctx.spec = api.parse_spec(ctx.raw_spec)
    except api.SpecError as e:
        errors.extend(e.errors)
        ctx.spec = None
    ctx.errors = errors
    if errors:
        ctx.spec = None  # nothing is built from a spec with any error
    ctx.obs.spec_errors = errors or None
    ctx.obs.generation = ctx.body["metadata"].get("generation")


def observe_spec(ctx: Context) -> None:
    """Status-only passes: parse the spec (later steps may need it) without re-judging it."""
    try:
        ctx.spec = api.parse_spec(ctx.raw_spec)
    except api.SpecError:
        ctx.spec = None


def ensure_training(ctx: Context) -> None:
    """Create what training needs, once; afterwards apply the spec-change policy and the live fields."""
    kube, owner = ctx.kube, ctx.owner
    ray_name = names.ray_job(owner.name)
    ctx.obs.ray_job_name = ray_name
    try:
        if not ctx.status.get("specHash") and ctx.spec is not None:
            # No RayJob was ever recorded: the common case is a new job, so create first, without a read.
            ray, existed = _create_children(ctx)
            if not existed:
                ctx.obs.ray_job, ctx.obs.rejected_fields = ray, []
                return
        else:
            ray = kube.get(RAYJOB, owner.namespace, ray_name)
        if ray is not None:
            check_owned(ray, {"kind": "RayJob", "metadata": {"ownerReferences": [owner.reference()]}})
        if ray is None:
            if ctx.status.get("specHash"):
                # It was created before and is gone: never re-run a training behind the user's back.
                ctx.obs.ray_job, ctx.obs.ray_job_deleted = None, True
            else:
                ctx.obs.ray_job = None  # invalid spec: nothing is built
            return
        ctx.obs.ray_job = ray
        ctx.obs.rejected_fields = _rejected_fields(ctx, ray)
        if ctx.obs.rejected_fields:
            ctx.obs.rejection_message = policy.rejection_message(ctx.obs.rejected_fields, ray_name)
        if ctx.spec is not None and not ctx.obs.rejected_fields:
            for obj in builders.training_children(owner, ctx.spec, ctx.settings, policy.spec_hash(ctx.raw_spec))[:-1]:
                if kube.ensure(obj):  # someone deleted it while the run goes on: the same content again
                    ctx.created.append(f"{obj['kind']} {obj['metadata']['name']}")
        if ctx.spec is not None:
            ctx.obs.ray_job = _apply_live_fields(kube, ray, ctx.spec)
    except NotOwned as e:
        # Never adopted, patched or used: the job waits (looked at again every 30 s) and says what is in the way.
        ctx.obs.extra_conditions.append(
            (c.BLOCKED, c.TRUE, c.NAME_CONFLICT, f"{e}; delete or rename it, or rename this job")
        )
        raise Retry(str(e), delay=30) from None
    except KubeError as e:
        if e.status == 422 and ctx.obs.ray_job is KEEP:
            # The API server (e.g. KubeRay's schema) refused what we built: retrying cannot help.
            ctx.obs.ray_job = None
            ctx.obs.failure = (c.CHILD_REJECTED, str(e))
            raise Invalid(str(e)) from None
        _raise_for(e)


def _create_children(ctx: Context) -> tuple[dict[str, Any] | None, bool]:
    """Create the children of a job that has no recorded RayJob: (RayJob, whether it existed already).

    The ConfigMap goes first. If it exists, an earlier pass died part-way: when that pass got as far as the
    RayJob, the run has started and nothing may change (the caller applies the policy to it); otherwise the
    ConfigMap may still be brought up to date with the current spec.
    """
    assert ctx.spec is not None
    kube, owner = ctx.kube, ctx.owner
    config, *rbac, ray_job = builders.training_children(owner, ctx.spec, ctx.settings, policy.spec_hash(ctx.raw_spec))
    if kube.ensure(config):
        ctx.created.append(f"ConfigMap {config['metadata']['name']}")
    else:
        ray = kube.get(RAYJOB, owner.namespace, ray_job["metadata"]["name"])
        if ray is not None:
            return ray, True
        existing = kube.get(CONFIGMAP, owner.namespace, config["metadata"]["name"]) or {}
        if existing.get("data") != config["data"]:
            kube.patch(CONFIGMAP, owner.namespace, config["metadata"]["name"], {"data": config["data"]})
    for obj in rbac:
        if kube.ensure(obj):
            ctx.created.append(f"{obj['kind']} {obj['metadata']['name']}")
    ray, created = kube.create(ray_job)
    if created:
        ctx.created.append(f"RayJob {ray_job['metadata']['name']}")
    return ray, not created


def _rejected_fields(ctx: Context, ray: dict[str, Any]) -> list[str]:
    applied_hash = (ray.get("metadata", {}).get("annotations") or {}).get(ANNOTATION_SPEC_HASH)
    if applied_hash == policy.spec_hash(ctx.raw_spec):
        return []
    cm = ctx.kube.get(CONFIGMAP, ctx.owner.namespace, names.config_map(ctx.owner.name))
    applied = applied_spec(cm) if cm else None
    if applied is None:
        return [f"spec.{f}" for f in policy.TRAINING_FIELDS]  # cannot tell which: name the whole set
    return policy.training_changes(applied, ctx.spec if ctx.spec is not None else ctx.raw_spec)


def _apply_live_fields(kube: Kube, ray: dict[str, Any], spec: api.FineTuneJobSpec) -> dict[str, Any]:
    patch = live_patch(ray, spec)  # suspend only when the user changed it: Kueue's own changes stay
    if not patch:
        return ray
    meta = ray["metadata"]
    log.info("RayJob %s/%s: applying live fields %s", meta["namespace"], meta["name"], sorted(patch.get("spec", {})))
    return kube.patch(RAYJOB, meta["namespace"], meta["name"], patch)


def _raise_for(e: KubeError) -> None:
    if e.status == 404:
        raise Retry(f"{e} (is KubeRay's RayJob CRD ray.io/v1 installed?)", delay=30) from None
    if e.status == 403:
        raise Retry(f"{e} (the operator's RBAC lacks a permission)", delay=30) from None
    raise Retry(str(e), delay=10) from None


SPEC_STEPS: list[Step] = [validate, guards.guard, ensure_training, reconcile_deploy.ensure_serving]
STATUS_STEPS: list[Step] = [observe_spec, reconcile_deploy.ensure_serving]


def run_status_steps(ctx: Context) -> Retry | None:
    """The status-only steps; a Retry stops them and is returned (the status is still written)."""
    for step in STATUS_STEPS:
        try:
            step(ctx)
        except Retry as e:
            return e
    return None


# --------------------------------------------------------------------------------------------- status


def write_status(ctx: Context) -> dict[str, Any]:
    """The one place a job's status is written: only operator-owned keys, only when changed."""
    current = ctx.status
    desired = desired_status(current, ctx.obs, now_rfc3339())
    patch = status_patch(current, desired)
    new_status = {**current, **desired}
    if patch:
        result = ctx.kube.patch_status(FINETUNEJOB, ctx.owner.namespace, ctx.owner.name, patch)
        if result is None:
            return new_status  # deleted meanwhile
        new_status = result.get("status") or new_status
    involved = ctx.owner.involved_object()
    transitions = transition_events(current, desired) if patch else []
    if ctx.created:
        # A new job's first Event says both what was made and what it waits for (one request, not two).
        waiting = next((ev for ev in transitions if ev.reason == c.PENDING), None)
        message = "created " + ", ".join(ctx.created) + (f"; {waiting.message}" if waiting else "")
        ctx.kube.post_event(involved, "Normal", "Created", message)
        transitions = [ev for ev in transitions if ev is not waiting]
    for ev in transitions:
        ctx.kube.post_event(involved, ev.type, ev.reason, ev.message)
    if patch and history.ended(current, new_status):  # kept past the Events' TTL (kubetune_operator.history)
        history.record(ctx.kube, ctx.owner, new_status)
    metrics.observe_job(
        ctx.owner.namespace, ctx.owner.name, new_status, created=ctx.body["metadata"].get("creationTimestamp")
    )
    return new_status


# ------------------------------------------------------------------------------------------ reconciler


def _ray_job_digest(ray_job: dict[str, Any]) -> str:
    """What of a RayJob the job's status depends on: its status and the spec hash it was built from."""
    meta = ray_job.get("metadata") or {}
    return json.dumps(
        [ray_job.get("status"), (meta.get("annotations") or {}).get(ANNOTATION_SPEC_HASH)], sort_keys=True
    )


class Reconciler:
    """Runs passes for jobs; one at a time per job."""

    def __init__(self, kube: Kube, settings: Settings):
        self.kube = kube
        self.settings = settings
        self._guard = threading.Lock()
        self._locks: weakref.WeakValueDictionary[tuple[str, str], threading.Lock] = weakref.WeakValueDictionary()
        self._seen: dict[str, str] = {}  # RayJob / Deployment uid -> digest of the status last synced
        self._inputs: dict[str, str] = {}  # FineTuneJob uid -> digest of the trainer-reported serving inputs
        self.live_jobs = LiveJobs()  # fed by the FineTuneJob watch (handlers.job_event)
        self._timers: dict[tuple[str, str], threading.Timer] = {}
        self._closed = False

    def _lock(self, namespace: str, name: str) -> threading.Lock:
        with self._guard:
            lock = self._locks.get((namespace, name))
            if lock is None:
                lock = threading.Lock()
                self._locks[(namespace, name)] = lock
            return lock

    def _context(self, namespace: str, name: str, fresh: dict[str, Any] | None = None) -> Context | None:
        """The job read from the API server; or `fresh`, kopf's body of a job just created, which no one has
        written a status to yet (reading it again would be one more request per new job and tell nothing)."""
        body = fresh if fresh is not None and not fresh.get("status") else self.kube.get(FINETUNEJOB, namespace, name)
        if body is None or body["metadata"].get("deletionTimestamp"):
            return None
        return Context(
            kube=self.kube,
            settings=self.settings,
            body=body,
            owner=Owner.from_body(body),
            raw_spec=body.get("spec") or {},
            live_jobs=self.live_jobs,
        )

    def reconcile(self, namespace: str, name: str, created: dict[str, Any] | None = None) -> dict[str, Any] | None:
        """A full pass; raises Invalid (status written) or Retry. Returns the new status.

        `created`: the job's body as kopf delivered its creation (used when it carries no status yet)."""
        lock = self._lock(namespace, name)
        with lock:
            ctx = self._context(namespace, name, created)
            if ctx is None:
                return None
            stop: Exception | None = None
            for step in SPEC_STEPS:
                try:
                    step(ctx)
                except (Retry, Invalid) as e:
                    stop = e
                    break
            status = write_status(ctx)
            if isinstance(ctx.obs.ray_job, dict):
                # The status now reflects this RayJob: its own ADDED/MODIFIED echo needs no second pass.
                self._seen[ctx.obs.ray_job["metadata"].get("uid", "")] = _ray_job_digest(ctx.obs.ray_job)
        if stop is not None:
            raise stop
        if ctx.errors:
            raise Invalid("; ".join(f"{p}: {m}" for p, m in ctx.errors))
        return status

    def on_ray_job(self, namespace: str, ray_job: dict[str, Any], *, deleted: bool = False) -> None:
        """KubeRay changed (or someone deleted) a RayJob of ours: bring the job's status up to date."""
        meta = ray_job.get("metadata") or {}
        owner_ref = next(
            (r for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("kind") == api.KIND), None
        )
        if owner_ref is None:
            return
        uid = meta.get("uid", "")
        digest = _ray_job_digest(ray_job)
        if deleted:
            self._seen.pop(uid, None)
        elif self._seen.get(uid) == digest:
            return  # e.g. a finalizer or our own live-field patch: nothing the status shows has changed
        lock = self._lock(namespace, owner_ref["name"])
        with lock:
            if not deleted and self._seen.get(uid) == digest:
                return  # a spec pass that held the lock has just written the status for this very RayJob
            ctx = self._context(namespace, owner_ref["name"])
            if ctx is None or ctx.owner.uid != owner_ref.get("uid"):
                return
            ctx.obs.ray_job_name = meta.get("name", "")
            if deleted:
                if self.kube.get(RAYJOB, namespace, meta.get("name", "")) is not None:
                    return  # already replaced
                ctx.obs.ray_job, ctx.obs.ray_job_deleted = None, True
            else:
                ctx.obs.ray_job = ray_job
            retry = run_status_steps(ctx)  # after the RayJob is observed: serving starts on its success
            write_status(ctx)
        if retry is not None:
            self._requeue(namespace, owner_ref["name"], retry)
        if not deleted:
            self._seen[uid] = digest

    def forget(self, ray_job_uid: str) -> None:
        self._seen.pop(ray_job_uid, None)

    # --- serving ------------------------------------------------------------------------------------------

    def serve(self, namespace: str, name: str) -> None:
        """A status pass for one job (serving follows its spec and status); requeued on API errors."""
        with self._lock(namespace, name):
            ctx = self._context(namespace, name)
            if ctx is None:
                return
            retry = run_status_steps(ctx)
            write_status(ctx)
        if retry is not None:
            self._requeue(namespace, name, retry)

    def on_deployment(self, namespace: str, deployment: dict[str, Any], *, deleted: bool = False) -> None:
        """The inference Deployment of a job changed (availability, replicas) or was deleted."""
        meta = deployment.get("metadata") or {}
        owner_ref = next(
            (r for r in meta.get("ownerReferences") or [] if r.get("controller") and r.get("kind") == api.KIND), None
        )
        if owner_ref is None:
            return
        uid = meta.get("uid", "")
        digest = json.dumps(
            [
                deployment.get("status"),
                meta.get("generation"),
                (deployment.get("spec") or {}).get("replicas"),
                meta.get("annotations"),
            ],
            sort_keys=True,
        )
        if deleted:
            self._seen.pop(uid, None)
        elif self._seen.get(uid) == digest:
            return
        with self._lock(namespace, owner_ref["name"]):
            ctx = self._context(namespace, owner_ref["name"])
            if ctx is None:
                return
            if ctx.owner.uid != owner_ref.get("uid"):
                # A namesake's leftover; once the garbage collector removed it, a job that found its serving
                # names taken (a job deleted and re-created under the same name) can serve now.
                blocked = (c.get(ctx.status.get("conditions"), c.DEPLOYED) or {}).get("reason") == c.NAME_CONFLICT
                if not (deleted and blocked):
                    return
            retry = run_status_steps(ctx)  # a deleted Deployment that should exist is made again
            write_status(ctx)
        if retry is not None:
            self._requeue(namespace, owner_ref["name"], retry)
        if not deleted:
            self._seen[uid] = digest

    def on_job_event(self, namespace: str, name: str, body: dict[str, Any], *, deleted: bool = False) -> None:
        """Any event of a FineTuneJob: a serving pass when the trainer reported a new model or evaluation
        after training succeeded (spec changes and RayJob transitions have passes of their own)."""
        if self.wants_serving_pass(namespace, name, body, deleted=deleted):
            self.serve(namespace, name)

    def wants_serving_pass(self, namespace: str, name: str, body: dict[str, Any], *, deleted: bool = False) -> bool:
        """The in-memory part of `on_job_event` (no request; the handler runs it on kopf's event loop, so that
        the few events per job that need nothing never queue for a handler thread)."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid", "")
        if deleted:
            self._inputs.pop(uid, None)
            self._cancel(namespace, name)
            return False
        st = body.get("status") or {}
        digest = json.dumps([st.get("model"), st.get("evaluation")], sort_keys=True)
        previous = self._inputs.get(uid)
        self._inputs[uid] = digest
        if not c.is_true(st.get("conditions"), c.SUCCEEDED):
            return False
        waiting = (c.get(st.get("conditions"), c.DEPLOYED) or {}).get("reason") in (
            c.AWAITING_EVALUATION,
            c.MODEL_UNAVAILABLE,
        )
        # Nothing new when unchanged (the first sight after a restart is covered by the resume pass).
        return not (previous == digest or (previous is None and not waiting))

    def _requeue(self, namespace: str, name: str, retry: Retry) -> None:
        """Run `serve` again after `retry.delay` seconds (kopf does not retry event handlers)."""
        with self._guard:
            if self._closed:
                return
            old = self._timers.pop((namespace, name), None)
            if old is not None:
                old.cancel()
            log.info("%s/%s: %s; retrying in %.0f s", namespace, name, retry, retry.delay)
            timer = threading.Timer(retry.delay, self._retry, args=(namespace, name))
            timer.daemon = True
            self._timers[(namespace, name)] = timer
            timer.start()

    def _retry(self, namespace: str, name: str) -> None:
        with self._guard:
            self._timers.pop((namespace, name), None)
            if self._closed:
                return
        try:
            self.serve(namespace, name)
        except Exception:  # a timer thread has no one to raise to
            log.exception("%s/%s: serving retry failed", namespace, name)

    def _cancel(self, namespace: str, name: str) -> None:
        with self._guard:
            timer = self._timers.pop((namespace, name), None)
        if timer is not None:
            timer.cancel()

    def close(self) -> None:
        """Cancel pending retries (the operator is stopping)."""
        with self._guard:
            self._closed = True
            timers, self._timers = list(self._timers.values()), {}
        for timer in timers:
            timer.cancel()


__all__ = ["Context", "Invalid", "Reconciler", "Retry", "SPEC_STEPS", "STATUS_STEPS", "write_status", "KEEP"]
