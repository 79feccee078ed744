"""Which start of the training this is, and why it restarted: the records behind status.restarts.

A run's workers start more than once when something fails:
- Ray Train restarts the worker group inside the same Ray job after a worker dies (FailureConfig.max_failures,
  spec.training.maxWorkerRestarts) or after a node is preempted or drained (max_preemption_failures,
  spec.training.maxPreemptionRestarts). The driver is the same process, so the driver id is the same.
- KubeRay runs the whole Ray job again on a new Ray cluster (spec.backoffLimit); the driver id is new.
Every start resumes from the newest complete checkpoint (kubetune_trainer.checkpoint), so what a restart cost
is the steps between that checkpoint and where the failed workers were.

Rank 0 keeps `<run_uri>/restarts.json`: {"driver": the last driver id, "starts": worker-group starts,
"preempted": whether the running group saw a preemption notice (set when it wrote its just-in-time checkpoint),
"restarts": [Restart wire dicts, oldest first]}. It is written only by the run's own rank 0 and only under its
own run prefix (one incarnation of one job), so no other run can read or change it.
"""

from __future__ import annotations

import logging
import time
from typing import Any, cast

from kubetune.api import Restart, TrainerConfig
from kubetune_trainer import storage

log = logging.getLogger(__name__)

KEEP = 20  # restarts kept in status.restarts (the oldest are dropped)


def _uri(cfg: TrainerConfig) -> str:
    return f"{cfg.run_uri}/restarts.json"


def _read(client: Any, cfg: TrainerConfig) -> dict[str, Any]:
    raw = storage.get_bytes(client, _uri(cfg))
    if not raw:
        return {}
    import json

    try:
        return cast("dict[str, Any]", json.loads(raw))
    except ValueError:
        log.warning("%s is not JSON; starting a new restart history", _uri(cfg))
        return {}


def classify(previous: dict[str, Any], driver_id: str) -> tuple[str, str] | None:
    """(cause, message) of this start given the record of earlier ones, or None for the run's first start."""
    if not previous.get("starts"):
        return None
    if previous.get("preempted"):
        return "NodePreempted", "a node of the worker group was preempted or drained; resumed from its checkpoint"
    if previous.get("driver") == driver_id:
        return "WorkerFailed", (
            "a training worker was lost; Ray Train restarted the worker group in the same "
            "Ray cluster (spec.training.maxWorkerRestarts)"
        )
    return "JobRetried", "the Ray job ran again (spec.backoffLimit, a new Ray cluster or a new driver)"


def record_start(
    client: Any,
    cfg: TrainerConfig,
    *,
    driver_id: str,
    resumed_step: int,
    resumed_from: str | None,
    trial: str | None = None,
) -> tuple[list[Restart], bool]:
    """Rank 0 at every start of the workers: count it, and when it is a restart, append why. Returns the
    restarts so far (newest last, at most KEEP) and whether this start is one of them."""
    previous = _read(client, cfg)
    restarts = [Restart.model_validate(r) for r in previous.get("restarts") or []]
    why = classify(previous, driver_id)
    if why is not None:
        cause, message = why
        restarts.append(
            Restart(
                time=_now(),
                cause=cause,
                message=message,
                resumed_step=resumed_step,
                resumed_from=resumed_from,
                trial=trial,
            )
        )
        log.warning(
            "restart %d (%s): resuming at step %d from %s",
            len(restarts),
            cause,
            resumed_step,
            resumed_from or "the start",
        )
    restarts = restarts[-KEEP:]
    storage.put_json(
        client,
        _uri(cfg),
        {
            "driver": driver_id,
            "starts": int(previous.get("starts") or 0) + 1,
            "preempted": False,
            "restarts": [r.wire() for r in restarts],
        },
    )
    return restarts, why is not None


def mark_preempted(client: Any, cfg: TrainerConfig) -> None:
    """Rank 0, after the just-in-time checkpoint of a preemption notice: the next start is NodePreempted."""
    record = _read(client, cfg)
    record["preempted"] = True
    storage.put_json(client, _uri(cfg), record)


def _now() -> str:
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
