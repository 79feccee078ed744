"""Serving the fine-tuned model: the reconcile step that keeps a job's inference Deployment and Service as
`spec.deploy` asks, and reports them through the `Deployed` condition and `status.endpoint`.

It runs in every pass (`reconcile.SPEC_STEPS` and `STATUS_STEPS`): a spec change (deploy fields are live, see
`policy`), KubeRay finishing the run, the Deployment's status moving, the trainer reporting its model or
evaluation. What it decides, in order:

1. Training has not succeeded (or the spec does not parse): nothing; serving is left as it is.
2. A Deployment or Service of that name exists and belongs to something else: `NameConflict`, hands off
   (and looks again later: usually the leftovers of a deleted namesake job, about to be garbage-collected).
3. Nothing is to be served: `spec.deploy.enabled` false (`Disabled`), the deployment gate
   `spec.deploy.minImprovement` not met or not measurable (`NotImproved`, with the base and fine-tuned
   figures) or not yet
   decidable (`AwaitingEvaluation`: the trainer has not reported `status.evaluation.improvement`), or the
   artifact cannot be served as asked (`ModelUnavailable`, `UnsupportedModel`, `ServingRejected`). Existing
   serving objects are deleted and `status.endpoint` removed. A job that never served gets no `Deployed`
   condition merely for having serving disabled.
4. Otherwise the Service and Deployment are created, or brought back to what the spec asks: when the
   annotation `kubetune.io/serving-hash` differs from the freshly built object the whole spec is replaced
   (PUT; the Service, whose clusterIP the server owns, is patched instead); when only `replicas` drifted (someone scaled by hand) it is patched.
   `status.endpoint` = {url: http://<service>.<namespace>.svc:8000/v1, model: served name}, and `Deployed`
   follows the Deployment (`deployed_condition`).

Training fields (output URI, method, LoRA rank) come from the spec the run was built with: while a training
change is rejected (`SpecChangeRejected`), they are read from the job's ConfigMap and only the deploy fields
from the current spec.

API errors are reported as `Deployed=False ServingError` and raised as `Retry`: a spec pass hands it to kopf,
which retries; status passes (which kopf does not retry) are requeued by the Reconciler.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from kubetune import api
from kubetune_operator import conditions as c
from kubetune_operator import guards, names, reconcile_server
from kubetune_operator.builders import inference
from kubetune_operator.builders.config import applied_spec
from kubetune_operator.kube import CONFIGMAP, DEPLOYMENT, SERVICE, KubeError, kind_of
from kubetune_operator.meta import Owner
from kubetune_operator.status import phase_of

if TYPE_CHECKING:
    from kubetune_operator.reconcile import Context

log = logging.getLogger(__name__)

Verdict = tuple[str, str, str]  # (status, reason, message) of the Deployed condition


# ------------------------------------------------------------------------------------------ pure parts


def gate(spec: api.FineTuneJobSpec, evaluation: Mapping[str, Any] | None) -> tuple[str, str] | None:
    """The deployment gate: None to deploy, else (reason, message) why not (yet)."""
    threshold = spec.deploy.min_improvement
    if threshold is None:
        return None
    ev = evaluation or {}
    improvement = ev.get("improvement")
    metric = ev.get("metric") or "the objective"
    figures = f"{metric}: base {_fmt(ev.get('base'))}, fine-tuned {_fmt(ev.get('fineTuned'))}"
    if not isinstance(improvement, (int, float)):
        if any(ev.get(k) is not None for k in ("metric", "base", "fineTuned", "reportUri")):
            # Evaluated, but without a comparison (e.g. no base figures): the gate cannot be passed.
            return (
                c.NOT_IMPROVED,
                f"not deployed: the evaluation gives no improvement over the base to compare "
                f"with spec.deploy.minImprovement {threshold:g} ({figures})",
            )
        return (
            c.AWAITING_EVALUATION,
            f"spec.deploy.minImprovement is {threshold:g}: waiting for the trainer's "
            "evaluation of the fine-tuned model against the base (status.evaluation.improvement)",
        )
    if improvement >= threshold:
        return None
    return (
        c.NOT_IMPROVED,
        f"not deployed: the fine-tune improves {metric} by {_fmt(improvement)}, less than "
        f"spec.deploy.minImprovement {threshold:g} ({figures})",
    )


def _fmt(x: Any) -> str:
    return f"{x:.4g}" if isinstance(x, (int, float)) else "unknown"


def deployed_condition(deployment: Mapping[str, Any], endpoint: Mapping[str, str]) -> Verdict:
    """The Deployed condition from a Deployment as the Deployment controller (and kubelets) left it."""
    name = deployment.get("metadata", {}).get("name", "")
    generation = deployment.get("metadata", {}).get("generation")
    replicas = (deployment.get("spec") or {}).get("replicas", 1)
    st = deployment.get("status") or {}
    conds = {x.get("type"): x for x in st.get("conditions") or []}
    available = int(st.get("availableReplicas") or 0)
    updated = int(st.get("updatedReplicas") or 0)
    stale = generation is not None and int(st.get("observedGeneration") or 0) < int(generation)
    if replicas == 0:
        return (
            c.FALSE,
            c.SCALED_TO_ZERO,
            f"spec.deploy.replicas is 0: Deployment {name} runs no replica "
            f"(the Service {endpoint.get('url', '')} stays)",
        )
    avail = conds.get("Available") or {}
    if avail.get("status") == c.TRUE and available > 0:
        msg = f"{available}/{replicas} replicas available; serving {endpoint.get('model')} at {endpoint.get('url')}"
        if stale or updated < replicas or available < replicas:
            msg += " (rolling out)"
        return (c.TRUE, c.AVAILABLE, msg)
    progressing = conds.get("Progressing") or {}
    if progressing.get("status") == c.FALSE and progressing.get("reason") == c.PROGRESS_DEADLINE_EXCEEDED:
        return (
            c.FALSE,
            c.PROGRESS_DEADLINE_EXCEEDED,
            f"Deployment {name}: {progressing.get('message') or 'progress deadline exceeded'}",
        )
    failure = conds.get("ReplicaFailure") or {}
    if failure.get("status") == c.TRUE:
        return (c.FALSE, c.REPLICA_FAILURE, f"Deployment {name}: {failure.get('message') or failure.get('reason')}")
    if not st or stale and not conds:
        return (c.FALSE, c.PROGRESSING, f"Deployment {name} created; waiting for the Deployment controller")
    return (
        c.FALSE,
        c.PROGRESSING,
        f"{available}/{replicas} replicas available; waiting for the weights to be fetched and vLLM to pass /health",
    )


# ------------------------------------------------------------------------------------------------ step


def ensure_serving(ctx: Context) -> None:
    """The serving step (see the module docstring)."""
    from kubetune_operator.reconcile import Retry

    if not _training_succeeded(ctx):
        return
    try:
        spec = _serving_spec(ctx)
        if spec is None:
            return
        _reconcile_serving(ctx, spec)
    except KubeError as e:
        if e.status == 422:
            _report(ctx, c.FALSE, c.SERVING_REJECTED, f"the API server refused the serving objects: {e}")
            return  # what we built is wrong for this cluster; retrying cannot help
        _report(ctx, c.FALSE, c.SERVING_ERROR, f"{e} (retrying)")
        raise Retry(f"serving: {e}", delay=15 if e.status not in (401, 403) else 60) from None


def _training_succeeded(ctx: Context) -> bool:
    ray_job = ctx.obs.ray_job
    if isinstance(ray_job, Mapping):
        return phase_of(ray_job).succeeded
    return c.is_true(ctx.status.get("conditions"), c.SUCCEEDED)


def _serving_spec(ctx: Context) -> api.FineTuneJobSpec | None:
    """The current deploy fields on the training fields the run was built with."""
    if ctx.spec is None:
        return None
    rejected = ctx.obs.rejected_fields
    if not isinstance(rejected, list):  # a status pass: the last spec pass's verdict is in the conditions
        rejected = c.is_true(ctx.status.get("conditions"), c.SPEC_CHANGE_REJECTED)
    if not rejected:
        return ctx.spec
    cm = ctx.kube.get(CONFIGMAP, ctx.owner.namespace, names.config_map(ctx.owner.name))
    applied = applied_spec(cm) if cm else None
    if applied is None:
        return None  # cannot tell what the run was: leave serving as it is
    return applied.model_copy(update={"deploy": ctx.spec.deploy})


def _reconcile_serving(ctx: Context, spec: api.FineTuneJobSpec) -> None:
    kube, owner = ctx.kube, ctx.owner
    name = names.inference(owner.name)
    existing = {kind.kind: kube.get(kind, owner.namespace, name) for kind in (SERVICE, DEPLOYMENT)}
    foreign = [k for k, obj in existing.items() if obj is not None and not _owned_by(obj, owner)]
    if foreign and spec.deploy.server:
        existing = {k: (None if k in foreign else obj) for k, obj in existing.items()}  # not ours, not in the way
    elif foreign:
        _report(
            ctx,
            c.FALSE,
            c.NAME_CONFLICT,
            f"{' and '.join(foreign)} {name} already exist(s) and belong(s) "
            "to something else; delete or rename it, or rename this job",
        )
        from kubetune_operator.reconcile import Retry

        # Often a namesake job's leftovers that the garbage collector is about to remove: look again.
        raise Retry(f"serving: {' and '.join(foreign)} {name} belong(s) to something else", delay=30)

    verdict = None if spec.deploy.enabled else (c.DISABLED, "spec.deploy.enabled is false")
    if verdict is None:
        verdict = gate(spec, ctx.status.get("evaluation"))
    plan = None
    if verdict is None:
        try:
            plan = inference.serving_plan(owner, spec, ctx.status.get("model"))
        except inference.NotServable as e:
            verdict = (e.reason, e.message)
    if plan is not None and spec.deploy.server:
        _remove_dedicated(ctx, existing, f"serving on inference server {spec.deploy.server}")
        shared = reconcile_server.serve_shared(ctx, spec, plan)
        _report(ctx, *shared)
        if shared[1] in (c.SECRET_NOT_FOUND, c.SECRET_KEY_MISSING):
            from kubetune_operator.reconcile import Retry

            # Secrets are not watched (the operator may only `get` them): look again, as for a job's own.
            raise Retry(shared[2], delay=guards.SECRET_RETRY_S)
        return
    if _was_shared(ctx):
        reconcile_server.unregister(ctx)
    if plan is None:
        assert verdict is not None
        removed = _remove_dedicated(ctx, existing, verdict[1], event=False)
        if removed:
            log.info("%s/%s: removed %s (%s)", owner.namespace, owner.name, ", ".join(removed), verdict[0])
            kube.post_event(
                owner.involved_object(), "Normal", "ServingRemoved", f"removed {', '.join(removed)}: {verdict[1]}"
            )
        had_condition = c.get(ctx.status.get("conditions"), c.DEPLOYED) is not None
        if verdict[0] != c.DISABLED or had_condition or removed:
            _report(ctx, c.FALSE, verdict[0], verdict[1])
        ctx.obs.endpoint = None
        return

    endpoint = inference.endpoint(owner, spec)
    deployment = None
    created: list[str] = []
    for obj in inference.serving_children(owner, spec, ctx.settings, plan):
        current = existing[obj["kind"]]
        result = _create(ctx, obj, created) if current is None else _update(ctx, current, obj)
        if obj["kind"] == "Deployment":
            deployment = result
    assert deployment is not None
    if created:
        # Its own reason (not the training children's `Created`), like ServingUpdated and ServingRemoved.
        kube.post_event(
            owner.involved_object(),
            "Normal",
            "ServingCreated",
            f"created {', '.join(created)} ({plan.mode}: {plan.model_uri})",
        )
    ctx.obs.endpoint = endpoint
    _report(ctx, *deployed_condition(deployment, endpoint))


def _remove_dedicated(ctx: Context, existing: dict[str, Any], why: str, *, event: bool = True) -> list[str]:
    """Delete the job's own Deployment and Service (those in `existing`); what was removed."""
    name = names.inference(ctx.owner.name)
    removed = [f"{k} {name}" for k, obj in existing.items() if obj is not None]
    for kind in (DEPLOYMENT, SERVICE):
        if existing[kind.kind] is not None:
            ctx.kube.delete(kind, ctx.owner.namespace, name)
    if removed and event:
        ctx.kube.post_event(
            ctx.owner.involved_object(), "Normal", "ServingRemoved", f"removed {', '.join(removed)}: {why}"
        )
    return removed


def _was_shared(ctx: Context) -> bool:
    """Whether the job may have a registration on a shared server (without a request: from its status)."""
    url = (ctx.status.get("endpoint") or {}).get("url") or ""
    reason = (c.get(ctx.status.get("conditions"), c.DEPLOYED) or {}).get("reason")
    dedicated = f"http://{names.inference(ctx.owner.name)}.{ctx.owner.namespace}.svc:"
    return bool(url and not url.startswith(dedicated)) or reason in (
        c.SERVER_NOT_FOUND,
        c.SERVER_INVALID,
        c.SERVER_REFUSED,
        c.CHAT_TEMPLATE_MISMATCH,
        c.SECRET_NOT_FOUND,  # the shared server's tokenSecretRef (a dedicated server's is checked before training)
        c.SECRET_KEY_MISSING,
    )


def _create(ctx: Context, obj: dict[str, Any], created_names: list[str]) -> dict[str, Any]:
    created_obj, created = ctx.kube.create(obj)
    if created:
        created_names.append(f"{obj['kind']} {obj['metadata']['name']}")
        return created_obj
    return _update(ctx, created_obj, obj)  # made meanwhile by another pass: bring it in line


def _update(ctx: Context, current: dict[str, Any], desired: dict[str, Any]) -> dict[str, Any]:
    meta = current["metadata"]
    want_hash = desired["metadata"]["annotations"][inference.ANNOTATION_SERVING_HASH]
    have_hash = (meta.get("annotations") or {}).get(inference.ANNOTATION_SERVING_HASH)
    kind = kind_of(desired)
    if have_hash != want_hash:
        if desired["kind"] == "Service":
            # clusterIP and friends are allocated by the server and immutable: patch the parts we own.
            patch = {
                "metadata": {
                    "labels": desired["metadata"]["labels"],
                    "annotations": {inference.ANNOTATION_SERVING_HASH: want_hash},
                },
                "spec": {"selector": desired["spec"]["selector"], "ports": desired["spec"]["ports"]},
            }
            result = ctx.kube.patch(kind, meta["namespace"], meta["name"], patch)
        else:
            replacement = {
                "apiVersion": desired["apiVersion"],
                "kind": desired["kind"],
                "metadata": {
                    **meta,
                    "labels": {**(meta.get("labels") or {}), **desired["metadata"]["labels"]},
                    "annotations": {**(meta.get("annotations") or {}), **desired["metadata"]["annotations"]},
                },
                "spec": desired["spec"],
            }
            # No resourceVersion: the operator owns this spec whole, and the Deployment controller's status
            # writes (a subresource, untouched by this PUT) would otherwise make nearly every replace a 409.
            for key in ("managedFields", "resourceVersion"):
                replacement["metadata"].pop(key, None)
            result = ctx.kube.replace(replacement)
        log.info("%s %s/%s: updated to the current spec.deploy", desired["kind"], meta["namespace"], meta["name"])
        ctx.kube.post_event(
            ctx.owner.involved_object(),
            "Normal",
            "ServingUpdated",
            f"updated {desired['kind']} {meta['name']} to the current spec.deploy",
        )
        return result
    if desired["kind"] == "Deployment" and (current.get("spec") or {}).get("replicas") != desired["spec"]["replicas"]:
        log.info("Deployment %s/%s: replicas back to %s", meta["namespace"], meta["name"], desired["spec"]["replicas"])
        return ctx.kube.patch(
            kind, meta["namespace"], meta["name"], {"spec": {"replicas": desired["spec"]["replicas"]}}
        )
    return current


def _owned_by(obj: Mapping[str, Any], owner: Owner) -> bool:
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return any(r.get("uid") == owner.uid for r in refs)


def _report(ctx: Context, status: str, reason: str, message: str) -> None:
    ctx.obs.extra_conditions = [x for x in ctx.obs.extra_conditions if x[0] != c.DEPLOYED]
    ctx.obs.extra_conditions.append((c.DEPLOYED, status, reason, message))


__all__ = ["deployed_condition", "ensure_serving", "gate"]
