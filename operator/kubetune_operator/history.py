"""A job's history kept past its RayCluster and past the API server's one-hour Event TTL: on the transition
to Succeeded or Failed, the operator writes a ConfigMap `<job>-history` (owned by the job) holding the final
conditions and the job's Events up to then.

Why a ConfigMap and not S3: the operator holds no S3 credentials, and reading every job's Secret to write on
its behalf would hand the one cluster-wide component every team's keys. The driver writes its own log to S3
(`kubetune.runlog`); what only the API server knows (conditions, Events) stays in the API server, with the job.
`kubetune status NAME` shows it. Best effort: a failure is logged and never fails a reconcile.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Mapping
from typing import Any

from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.kube import CONFIGMAP, KINDS, Kube, KubeError
from kubetune_operator.meta import Owner, object_meta

log = logging.getLogger(__name__)

EVENT = KINDS[("v1", "Event")]
COMPONENT = "history"
CONDITIONS_KEY, EVENTS_KEY = "conditions.json", "events.json"
MAX_EVENTS = 200  # a ConfigMap holds at most 1 MiB; Event messages are at most 1 KiB


def config_map_name(job: str) -> str:
    return names.child_name(job, "history")


def ended(before: Mapping[str, Any], after: Mapping[str, Any]) -> bool:
    """Whether this status write moves a job that ran (it had a RayJob) to Succeeded or Failed.

    A job refused before anything was built (an invalid spec) has no run to remember: its conditions say all,
    and it must leave nothing behind but itself.
    """
    if not (after.get("rayJob") or before.get("rayJob")):
        return False
    return any(
        c.is_true(after.get("conditions"), t) and not c.is_true(before.get("conditions"), t)
        for t in (c.SUCCEEDED, c.FAILED)
    )


def event_record(ev: Mapping[str, Any]) -> dict[str, Any]:
    """What of an Event is kept: when, what kind, why, what it said, and who said it."""
    return {
        "type": ev.get("type"),
        "reason": ev.get("reason"),
        "message": ev.get("message"),
        "count": ev.get("count"),
        "firstTimestamp": ev.get("firstTimestamp") or ev.get("eventTime"),
        "lastTimestamp": ev.get("lastTimestamp") or ev.get("eventTime"),
        "source": (ev.get("source") or {}).get("component") or ev.get("reportingComponent"),
    }


def _order(ev: Mapping[str, Any]) -> tuple[str, int]:
    """Oldest first: by last time (whole seconds), then by the order the API server stored them."""
    rv = str((ev.get("metadata") or {}).get("resourceVersion") or "0")
    return (str(ev.get("lastTimestamp") or ev.get("eventTime") or ""), int(rv) if rv.isdigit() else 0)


def history_config_map(owner: Owner, status: Mapping[str, Any], events: list[dict[str, Any]]) -> dict[str, Any]:
    """The ConfigMap (pure): conditions and Events, oldest Event first."""
    kept = [event_record(e) for e in sorted(events, key=_order)][-MAX_EVENTS:]
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(owner, config_map_name(owner.name), COMPONENT),
        "data": {
            CONDITIONS_KEY: json.dumps(status.get("conditions") or [], indent=1, sort_keys=True),
            EVENTS_KEY: json.dumps(kept, indent=1, sort_keys=True),
        },
    }


def record(kube: Kube, owner: Owner, status: Mapping[str, Any]) -> None:
    """Write (or bring up to date) the job's history ConfigMap; never raises."""
    try:
        events = kube.list(EVENT, owner.namespace, field_selector=f"involvedObject.uid={owner.uid}")
        cm = history_config_map(owner, status, events)
        existing, created = kube.create(cm)
        if not created and existing.get("data") != cm["data"]:
            kube.patch(CONFIGMAP, owner.namespace, cm["metadata"]["name"], {"data": cm["data"]})
    except KubeError as e:
        log.warning("%s/%s: could not keep the history (%s)", owner.namespace, owner.name, e)


__all__ = ["config_map_name", "ended", "history_config_map", "record"]
