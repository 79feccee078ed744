"""Shared inference servers (spec.deploy.server): registering a job's adapter, keeping the server's Deployment
and Service in line with its declaration and registrations, and the job's `Deployed` condition on it.

Who calls what (see `kubetune_operator.builders.shared_server` for the objects and why):
- a job's serving step (`reconcile_deploy`) with `spec.deploy.server` set: `serve_shared` writes the job's
  registration ConfigMap, syncs the server, and reports `Deployed` / `status.endpoint`; without it (or when
  nothing is to be served) `unregister` deletes the registration;
- a declaration or registration ConfigMap changed or went away (the garbage collector deletes a job's
  registration with the job): `on_server_object` syncs the server, then gives each registered job a status
  pass when the declaration or the server's Deployment moved.

An hf:// base with `tokenSecretRef`: before the server's Deployment is created or changed, the Secret and its
key are checked as a job's own Secrets are (`guards.secret_problem`); a missing one leaves the Deployment as
it is and is reported in every using job's `Deployed` condition (SecretNotFound / SecretKeyMissing, naming
the Secret, the key and the server), retried every 15 s since Secrets are not watched. A running server is
not held back: its pods already hold the token.

One server is synced by one thread at a time (`_lock`); every sync reads the declaration and lists the
registrations fresh, so the last one always builds from the latest set.
"""

from __future__ import annotations

import json
import logging
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune import api
from kubetune_operator import conditions as c
from kubetune_operator import guards
from kubetune_operator.builders import inference
from kubetune_operator.builders import shared_server as ss
from kubetune_operator.builders.inference import ServingPlan
from kubetune_operator.kube import CONFIGMAP, SERVICE, Kube, kind_of
from kubetune_operator.meta import LABEL_JOB
from kubetune_operator.settings import Settings

if TYPE_CHECKING:
    from kubetune_operator.reconcile import Context, Reconciler

log = logging.getLogger(__name__)

_guard = threading.Lock()
_locks: dict[tuple[str, str], threading.Lock] = {}
_seen: dict[str, str] = {}  # server Deployment uid -> digest of what its jobs' status depends on


def _lock(namespace: str, server: str) -> threading.Lock:
    with _guard:
        return _locks.setdefault((namespace, server), threading.Lock())


@dataclass
class ServerState:
    """What a sync found: a problem (reason, message) or the server's spec, registrations and Deployment."""

    problem: tuple[str, str] | None = None
    spec: api.InferenceServerSpec | None = None
    adapters: list[ss.Adapter] = field(default_factory=list)
    deployment: dict[str, Any] | None = None


def sync_server(kube: Kube, settings: Settings, namespace: str, server: str) -> ServerState:
    """Bring server `server`'s Service and Deployment in line with its declaration and registrations."""
    with _lock(namespace, server):
        decl = kube.get(CONFIGMAP, namespace, server)
        if decl is None or ((decl["metadata"].get("labels") or {}).get(ss.LABEL_SERVER) != server):
            return ServerState(
                problem=(
                    c.SERVER_NOT_FOUND,
                    f"waiting for inference server {server}: no ConfigMap "
                    f"{server} labelled {ss.LABEL_SERVER}={server} in {namespace} "
                    "(spec.deploy.server; docs/serving.md)",
                )
            )
        try:
            spec = ss.declaration_spec(decl)
        except ss.InvalidDeclaration as e:
            return ServerState(problem=(c.SERVER_INVALID, f"inference server {server}: {e}"))
        regs = kube.list(CONFIGMAP, namespace, f"{ss.LABEL_SERVER}={server},{LABEL_JOB}")
        adapters = [a for a in map(ss.adapter_of, regs) if a is not None]
        usable = ss.usable_adapters(server, spec, adapters)
        objects = [ss.service(decl), ss.deployment(decl, spec, usable, settings)]
        currents = {obj["kind"]: kube.get(kind_of(obj), namespace, server) for obj in objects}
        for kind, current in currents.items():
            if current is not None and not _owned_by(current, decl["metadata"]["uid"]):
                return ServerState(
                    problem=(
                        c.NAME_CONFLICT,
                        f"{kind} {server} exists and does not belong to "
                        f"inference server {server}'s declaration; delete or rename it",
                    )
                )
        if _changes(currents["Deployment"], objects[1]):
            problem = token_problem(kube, namespace, server, spec)
            if problem is not None:
                return ServerState(problem=problem)
        results = {
            obj["kind"]: _apply(kube, currents[obj["kind"]], obj, decl, [a.model for a in usable]) for obj in objects
        }
        return ServerState(spec=spec, adapters=adapters, deployment=results["Deployment"])


def token_problem(kube: Kube, namespace: str, server: str, spec: api.InferenceServerSpec) -> tuple[str, str] | None:
    """(reason, message) when the hf:// token Secret the declaration names, or its key, is missing."""
    ref = spec.token_secret_ref
    if ref is None or not spec.base_model.startswith("hf://"):
        return None
    field = f"tokenSecretRef in server.yaml of inference server {server}"
    return guards.secret_problem(ref.name, namespace, kube.get_secret_keys(namespace, ref.name), field, (ref.key,))


def _changes(current: dict[str, Any] | None, desired: dict[str, Any]) -> bool:
    """Whether `_apply` would create or replace the object."""
    if current is None:
        return True
    have = (current["metadata"].get("annotations") or {}).get(inference.ANNOTATION_SERVING_HASH)
    return bool(have != desired["metadata"]["annotations"][inference.ANNOTATION_SERVING_HASH])


def _apply(
    kube: Kube, current: dict[str, Any] | None, desired: dict[str, Any], decl: dict[str, Any], models: list[str]
) -> dict[str, Any]:
    """Create `desired`, or bring `current` to it when its serving hash differs."""
    if current is None:
        created, _ = kube.create(desired)
        return created
    meta = current["metadata"]
    want = desired["metadata"]["annotations"][inference.ANNOTATION_SERVING_HASH]
    if not _changes(current, desired):
        return current
    if desired["kind"] == "Service":  # clusterIP is the server's: patch only what we own
        return kube.patch(
            SERVICE,
            meta["namespace"],
            meta["name"],
            {
                "metadata": {"annotations": {inference.ANNOTATION_SERVING_HASH: want}},
                "spec": {"selector": desired["spec"]["selector"], "ports": desired["spec"]["ports"]},
            },
        )
    replacement = {**desired, "metadata": {**desired["metadata"], "uid": meta.get("uid")}}
    result = kube.replace(replacement)
    involved = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "name": decl["metadata"]["name"],
        "namespace": decl["metadata"]["namespace"],
        "uid": decl["metadata"]["uid"],
    }
    kube.post_event(
        involved, "Normal", "ServerUpdated", f"Deployment {meta['name']} now serves {', '.join(models) or 'no adapter'}"
    )
    return result


def _owned_by(obj: Mapping[str, Any], uid: str) -> bool:
    return any(r.get("uid") == uid for r in (obj.get("metadata") or {}).get("ownerReferences") or [])


# ------------------------------------------------------------------------------------------- a job


def adapter_for(ctx: Context, spec: api.FineTuneJobSpec, plan: ServingPlan) -> ss.Adapter:
    assert plan.base_uri is not None and plan.max_lora_rank is not None
    uses_template, template = ss.job_template(spec)
    return ss.Adapter(
        job=ctx.owner.name,
        model=plan.served_model_name,
        uri=plan.model_uri,
        base_uri=plan.base_uri,
        base_revision=plan.base_revision,
        rank=inference.max_lora_r(spec),
        endpoint=spec.dataset.endpoint,
        region=spec.dataset.region,
        secret=spec.dataset.credentials_secret,
        chat_template=template,
        uses_chat_template=uses_template,
    )


def serve_shared(ctx: Context, spec: api.FineTuneJobSpec, plan: ServingPlan) -> tuple[str, str, str]:
    """Register the job's adapter on spec.deploy.server, sync the server; the Deployed verdict."""
    server = spec.deploy.server
    assert server is not None
    kube, owner = ctx.kube, ctx.owner
    adapter = adapter_for(ctx, spec, plan)
    reg = ss.registration(owner, server, adapter)
    current = kube.get(CONFIGMAP, owner.namespace, reg["metadata"]["name"])
    if current is not None and not _owned_by(current, owner.uid):
        ctx.obs.endpoint = None
        return (
            c.FALSE,
            c.NAME_CONFLICT,
            f"ConfigMap {reg['metadata']['name']} (this job's adapter registration for "
            f"inference server {server}) exists and belongs to something else; delete it or rename this job",
        )
    if current is None:
        kube.create(reg)
    elif current.get("data") != reg["data"] or (current["metadata"].get("labels") or {}) != reg["metadata"]["labels"]:
        kube.patch(
            CONFIGMAP,
            owner.namespace,
            reg["metadata"]["name"],
            {"metadata": {"labels": reg["metadata"]["labels"]}, "data": reg["data"]},
        )
    state = sync_server(kube, ctx.settings, owner.namespace, server)
    if state.problem is not None:
        ctx.obs.endpoint = None
        return (c.FALSE, *state.problem)
    assert state.spec is not None and state.deployment is not None
    mine = next((a for a in state.adapters if a.job == owner.name), adapter)
    refused = ss.refusal(server, state.spec, mine, state.adapters)
    if refused is not None:
        ctx.obs.endpoint = None
        return (c.FALSE, *refused)
    endpoint = ss.endpoint(server, owner.namespace, plan.served_model_name)
    ctx.obs.endpoint = endpoint
    return shared_condition(state.deployment, endpoint, server)


def shared_condition(deployment: dict[str, Any], endpoint: Mapping[str, str], server: str) -> tuple[str, str, str]:
    """Deployed for an adapter on a shared server: True once every replica runs a template that has it."""
    from kubetune_operator.reconcile_deploy import deployed_condition

    model = endpoint.get("model") or ""
    if model not in ss.served_models(deployment):
        return (c.FALSE, c.PROGRESSING, f"adding {model} to inference server {server}")
    status, reason, message = deployed_condition(deployment, endpoint)
    meta, st = deployment.get("metadata") or {}, deployment.get("status") or {}
    rolling = int(st.get("observedGeneration") or 0) < int(meta.get("generation") or 0) or int(
        st.get("updatedReplicas") or 0
    ) < int((deployment.get("spec") or {}).get("replicas", 1))
    if status == c.TRUE and rolling:
        return (c.FALSE, c.PROGRESSING, f"inference server {server} is rolling out with {model}: {message}")
    return (status, reason, f"on inference server {server}: {message}" if status == c.TRUE else message)


def unregister(ctx: Context) -> bool:
    """Remove the job's registration (it no longer serves on a shared server); True when one was removed."""
    name = ss.registration_name(ctx.owner.name)
    current = ctx.kube.get(CONFIGMAP, ctx.owner.namespace, name)
    if current is None or not _owned_by(current, ctx.owner.uid):
        return False
    ctx.kube.delete(CONFIGMAP, ctx.owner.namespace, name)  # its DELETED event syncs the server
    return True


# ------------------------------------------------------------------------------------------- events


def on_server_object(reconciler: Reconciler, namespace: str, obj: dict[str, Any], *, deleted: bool) -> None:
    """A server's ConfigMap or Deployment changed: a registration -> sync the server; the declaration -> sync
    and a status pass for each registered job; the server's Deployment moved -> a status pass for each."""
    meta = obj.get("metadata") or {}
    labels = meta.get("labels") or {}
    server = labels.get(ss.LABEL_SERVER)
    if not server:
        return
    kind = obj.get("kind") or "ConfigMap"
    if kind == "ConfigMap" and LABEL_JOB in labels:
        sync_server(reconciler.kube, reconciler.settings, namespace, server)
        return
    if kind == "Deployment":
        uid = meta.get("uid", "")
        digest = json.dumps([obj.get("status"), meta.get("generation")], sort_keys=True)
        if deleted:
            _seen.pop(uid, None)
        elif _seen.get(uid) == digest:
            return
        else:
            _seen[uid] = digest
    else:
        sync_server(reconciler.kube, reconciler.settings, namespace, server)
    regs = reconciler.kube.list(CONFIGMAP, namespace, f"{ss.LABEL_SERVER}={server},{LABEL_JOB}")
    for job in sorted({(r["metadata"].get("labels") or {}).get(LABEL_JOB, "") for r in regs} - {""}):
        reconciler.serve(namespace, job)  # its serving step syncs (a no-op when nothing changed) and reports


__all__ = [
    "ServerState",
    "on_server_object",
    "serve_shared",
    "shared_condition",
    "sync_server",
    "token_problem",
    "unregister",
]
