"""What runs in a Tune trial's actor: one Ray Train run (train.fit) with the trial's parameters, in the
trial's own S3 prefix, its evaluations forwarded to Tune."""

from __future__ import annotations

import json
import logging
import os
from typing import Any

from kubetune.api import TrainerConfig
from kubetune_trainer import storage
from kubetune_trainer.tune_space import clean_params, trial_config, trial_id_of

log = logging.getLogger("kubetune_trainer")

TRIAL_WORKER_START_TIMEOUT_S = 1800


def run_trial(
    config: dict[str, Any],
    *,
    job_config: dict[str, Any],
    prepared: dict[str, Any],
    options: dict[str, Any],
    verdicts: dict[str, Any],
) -> None:
    """A Tune trial (runs in its trial actor): fit one Ray Train run with the trial's parameters. `verdicts`:
    where its workers learn Tune's verdicts at ASHA's rungs ({"board", "milestones"}, tune_verdicts)."""
    import ray.tune

    from kubetune_trainer.data import PreparedData, s3_client
    from kubetune_trainer.train import RunOptions, fit

    # A trial may wait for another trial's workers to finish (or for the autoscaler) before its own can start;
    # Ray Train gives a worker group 60 s by default, then fails the trial. The controller gets this process's
    # environment.
    os.environ.setdefault("RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S", str(TRIAL_WORKER_START_TIMEOUT_S))
    cfg = TrainerConfig.model_validate(job_config)
    trial_id = trial_id_of(ray.tune.get_context().get_trial_id())
    params = dict(config["params"])
    tcfg = trial_config(cfg, trial_id, params)
    client = s3_client(cfg.spec.dataset.endpoint, cfg.spec.dataset.region)
    claim_prefix(client, tcfg, params)
    fit(
        tcfg,
        PreparedData(**prepared),
        RunOptions(**options),
        trial={"id": trial_id, "params": clean_params(params), "jobRunUri": cfg.run_uri, **verdicts},
    )


def claim_prefix(client: Any, tcfg: TrainerConfig, params: dict[str, Any]) -> None:
    """Own <run>/trials/<id>/: keep it when it holds this very trial (a retried driver resumes from its
    checkpoints), wipe it when an earlier run used the id for other parameters."""
    uri = f"{tcfg.run_uri}/params.json"
    wanted = {"params": params, "training": tcfg.spec.training.wire()}
    raw = storage.get_bytes(client, uri)
    if raw is not None:
        try:
            same = json.loads(raw) == json.loads(json.dumps(wanted))
        except ValueError:
            same = False
        if same:
            return
        removed = storage.delete_prefix(client, tcfg.run_uri)
        log.info("%s held a trial with other parameters; removed %d objects", tcfg.run_uri, removed)
    storage.put_json(client, uri, wanted)


def trial_run_config(cfg: TrainerConfig, options: Any, trial: dict[str, Any]) -> Any:
    """ray.train.RunConfig of a trial's Train run: named after the trial, results forwarded to Tune."""
    from ray.train import RunConfig
    from ray.tune.integration.ray_train import TuneReportCallback

    return RunConfig(
        name=f"{cfg.job.namespace}-{cfg.job.name}-{trial['id']}",
        storage_path=options.ray_storage or None,
        # Ray Train v2's callback (RAY_TRAIN_V2_ENABLED); mypy sees ray.train's v1 RunConfig, and its __init__ is
        # unannotated.
        callbacks=[TuneReportCallback()],  # type: ignore[no-untyped-call,list-item]  # see above
    )
