"""kopf handlers: thin. Each one names the object, hands it to the Reconciler, and maps the outcome to kopf.

- FineTuneJob created / spec changed / operator resumed -> `Reconciler.reconcile` (full pass). kopf keeps the
  handler's progress and the last handled spec in annotations under `kubetune.io/` (status.kopf would be pruned
  by the structural schema).
- RayJob of ours (label kubetune.io/job) changed or deleted -> `Reconciler.on_ray_job` (status only).
- Inference Deployment of ours (labels kubetune.io/job, app.kubernetes.io/component=inference) changed or
  deleted -> `Reconciler.on_deployment` (status, and serving put back as the spec asks).
- ConfigMaps and Deployments labelled kubetune.io/inference-server (a shared server's declaration, the jobs'
  adapter registrations, the server's Deployment) -> `reconcile_server.on_server_object` (the server synced
  with its registrations; the registered jobs' status).
- Any FineTuneJob event -> the metrics index (no API calls; trainer progress shows up in /metrics), and
  `Reconciler.on_job_event`, which acts only when the trainer reported a new model or evaluation after
  training succeeded (e.g. the evaluation the deployment gate waits for).

There are no deletion handlers and no finalizers: children go with their owner through the garbage collector,
so deleting a job never waits for the operator.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any, NotRequired, TypedDict

import kopf

from kubetune import api
from kubetune_operator import metrics, reconcile_server
from kubetune_operator.builders.shared_server import LABEL_SERVER
from kubetune_operator.meta import LABEL_JOB
from kubetune_operator.reconcile import Invalid, Reconciler, Retry

log = logging.getLogger(__name__)


class KopfResource(TypedDict):
    """The keywords that name a kind to kopf's decorators (typed, so `**FTJ` type-checks against them)."""

    group: NotRequired[str]
    version: str
    plural: str


FTJ: KopfResource = {"group": api.GROUP, "version": api.VERSION, "plural": api.PLURAL}
RAYJOB: KopfResource = {"group": "ray.io", "version": "v1", "plural": "rayjobs"}
DEPLOYMENT: KopfResource = {"group": "apps", "version": "v1", "plural": "deployments"}
CONFIGMAP: KopfResource = {"version": "v1", "plural": "configmaps"}


def reconcile_job(namespace: str | None, name: str, memo: kopf.Memo, body: kopf.Body, reason: str, **_: Any) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    created = dict(body) if reason == kopf.Reason.CREATE else None  # a new job's body needs no second read
    with metrics.time_reconcile("reconcile"):
        try:
            reconciler.reconcile(namespace, name, created)
            log.info("%s/%s: reconciled", namespace, name)  # one line per full pass: restarts can be followed
        except Invalid as e:
            raise kopf.PermanentError(str(e)) from None
        except Retry as e:
            raise kopf.TemporaryError(str(e), delay=e.delay) from None


def ray_job_event(type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    with metrics.time_reconcile("rayjob"):
        reconciler.on_ray_job(namespace, dict(body), deleted=type == "DELETED")


def deployment_event(type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    with metrics.time_reconcile("deployment"):
        reconciler.on_deployment(namespace, dict(body), deleted=type == "DELETED")


def server_event(type: str | None, body: kopf.Body, namespace: str | None, memo: kopf.Memo, **_: Any) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    with metrics.time_reconcile("server"):
        reconcile_server.on_server_object(reconciler, namespace, dict(body), deleted=type == "DELETED")


# The two handlers below see every event of every FineTuneJob (a new job has four or five) and nearly always
# need no request: they run on kopf's event loop (async) instead of queueing for the handler threads, where they
# would hold each event's body and delay the passes that do work (a burst of new jobs: 8 of every 10 tasks).
async def serving_inputs_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    if reconciler.wants_serving_pass(namespace, name, dict(body), deleted=type == "DELETED"):
        await asyncio.get_running_loop().run_in_executor(None, reconciler.serve, namespace, name)


async def job_event(
    type: str | None, body: kopf.Body, namespace: str | None, name: str, memo: kopf.Memo, **_: Any
) -> None:
    assert namespace is not None  # kopf types it for cluster-scoped kinds too; these kinds are namespaced
    reconciler: Reconciler = memo.reconciler
    if type == "DELETED":
        metrics.forget_job(namespace, name)
        reconciler.live_jobs.forget(body["metadata"].get("uid", ""))
    else:
        metrics.observe_job(namespace, name, body.get("status"), created=body["metadata"].get("creationTimestamp"))
        reconciler.live_jobs.observe(dict(body))


def register(registry: kopf.OperatorRegistry) -> None:
    """Attach the handlers to `registry` (the webhook is registered separately, when enabled)."""
    for on in (kopf.on.resume, kopf.on.create, kopf.on.update):
        on(**FTJ, id="reconcile", registry=registry)(reconcile_job)
    kopf.on.event(**RAYJOB, labels={LABEL_JOB: kopf.PRESENT}, id="rayjob", registry=registry)(ray_job_event)
    kopf.on.event(
        **DEPLOYMENT,
        labels={LABEL_JOB: kopf.PRESENT, "app.kubernetes.io/component": "inference"},
        id="deployment",
        registry=registry,
    )(deployment_event)
    for kind in (CONFIGMAP, DEPLOYMENT):
        kopf.on.event(**kind, labels={LABEL_SERVER: kopf.PRESENT}, id="server", registry=registry)(server_event)
    kopf.on.event(**FTJ, id="metrics", registry=registry)(job_event)
    kopf.on.event(**FTJ, id="serving-inputs", registry=registry)(serving_inputs_event)
