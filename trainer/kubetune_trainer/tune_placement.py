"""Releasing the placement groups of tuning trials that Tune stopped early (driver side)."""

from __future__ import annotations

import logging
import threading

log = logging.getLogger("kubetune_trainer")


def reclaim_orphaned_placement_groups() -> int:
    """Remove the placement groups of Ray Train runs whose controller died (returns how many).

    When ASHA stops a trial, Tune ends its trial actor; the trial's Train controller, owned by that actor,
    dies with it, and its workers' placement group stays reserved until the whole job ends (a placement
    group lives as long as its creator's *job*). Ray Train's own PlacementGroupCleaner notices a dead
    controller through the State API, which needs Ray's dashboard (`ray[default]`): without it every early
    stop would leak the trial's CPUs/GPUs and starve the trials after it. Here the GCS says it directly:
    a non-detached group of this job whose creating actor is dead is an orphan.
    """
    import ray
    from ray._private.state import state as global_state
    from ray.core.generated import gcs_pb2
    from ray.util.placement_group import PlacementGroup, remove_placement_group

    job = ray.get_runtime_context().get_job_id()
    removed = 0
    for raw in global_state._connect_and_get_accessor().get_placement_group_table():
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)  # type: ignore[attr-defined]  # generated protobuf, no stubs
        # A group made by a driver (Tune's own, for the trial actors) has a nil creator actor, which the GCS
        # counts as dead: only groups made by an actor (a Train controller) qualify.
        made_by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if (
            pg.state == gcs_pb2.PlacementGroupTableData.CREATED  # type: ignore[attr-defined]  # generated protobuf, no stubs
            and not pg.is_detached
            and made_by_actor
            and pg.creator_actor_dead
            and pg.creator_job_id.hex() == job
        ):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    if removed:
        log.info("released %d placement group(s) of stopped trials", removed)
    return removed


class Reclaimer:
    """Runs reclaim_orphaned_placement_groups every few seconds while Tune runs (driver side)."""

    def __init__(self, interval: float = 5.0):
        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="kubetune-pg-reclaimer", daemon=True)

    def __enter__(self) -> Reclaimer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=10)

    def _run(self) -> None:
        failures = 0
        while not self._stop.wait(self._interval):
            try:
                reclaim_orphaned_placement_groups()
            except Exception as exc:  # noqa: BLE001 - an optimisation; Ray's cleaner may still do it
                failures += 1
                if failures <= 3:
                    log.warning("could not check for orphaned placement groups (%s: %s)", type(exc).__name__, exc)
