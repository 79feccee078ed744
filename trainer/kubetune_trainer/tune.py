"""Hyperparameter search (the driver): Ray Tune trials of the same training on the job's Ray cluster; the best
one ships. Its parts: tune_space.py (search space, trial specs, best trial; pure), tune_trial.py (what runs in
a trial's actor), tune_tracker.py (the Tune callback that reports trials), tune_placement.py (placement groups
of stopped trials), tune_verdicts.py (Tune's verdicts at ASHA's rungs, told to a trial's workers).

Ray 2.60 runs Ray Train V2, whose Tune integration is a Tune *function trainable* that builds and fits a
`TorchTrainer` for its trial (Ray's guide "Hyperparameter Tuning with Ray Tune"; passing a Trainer to
`ray.tune.Tuner` is the deprecated V1 way):

    driver (RayJob entrypoint)                    Tune trial actor (0 CPU)          Ray Train workers
    Tuner(run_trial, param_space, ASHA) ---->     run_trial(config):          ----> train.train_loop with the
      TrialTracker (a tune.Callback): status        train.fit(trial cfg,               trial's training fields;
      .trials/.bestTrial/progress.percent           TuneReportCallback)                ray.train.report at each
    best trial -> <run>/model, eval/report.json                                        evaluation -> Tune

- One trial = the job's training with the trial's parameters applied to spec.training (dotted fields such as
  `lora.r`), `maxStepsPerTrial` steps, its own prefix `<run>/trials/<trial-id>/` (checkpoints/, metrics.jsonl,
  model/, eval/report.json, params.json). Trial ids are `trial-00`, `trial-01`, ... in Tune's order, so a
  retried driver finds its trials' checkpoints again (and a prefix written with other parameters is wiped).
- Search: `random` samples `trials` configurations (seeded with training.seed); `grid` is a `tune.grid_search`
  over every combination of the choice values (fields in name order, the last one varying fastest).
- Early stopping: `asha` is Tune's ASHAScheduler on the objective, with the optimizer step as its time
  attribute, so trials are compared at the same step; grace period = one evaluation interval. At each of
  ASHA's rungs a trial's workers wait for Tune's verdict (tune_verdicts.py): a stopped trial trains no step
  past the rung it lost at, and writes no checkpoint or model after it.
- Resources: each trial actor only drives its Ray Train run, so it asks for no CPU (only a little of Ray's
  logical memory: Tune refuses an empty request); the trial's workers ask for what a worker of the job asks for. `maxConcurrentTrials` bounds the trials (and Train runs) in flight:
  trials x workers x CPU-per-worker must fit the cluster, or Ray Train waits for resources.
- Retries: Tune's experiment state lives in S3 under the run prefix (`<run>/tune/<namespace>-<name>-tune/`,
  `experiment_storage`), so a retried job (a new driver, or a new RayCluster after `backoffLimit`) restores it
  with `Tuner.restore`: finished trials are kept (their results and models), unfinished and errored ones run
  again, and each resumes from the newest checkpoint under its own prefix.
- The best trial is the best objective among trials that finished (were trained to the end and exported):
  an early-stopped trial's figure is from an earlier step and it has no model. Its model, its report and its
  metrics become the job's (`<run>/model`, `<run>/eval/report.json` with a `trials` table, `<run>/metrics.jsonl`).
"""

from __future__ import annotations

import copy
import json
import logging
import time
from dataclasses import asdict
from typing import Any

from kubetune.api import EvaluationSummary, ModelArtifact, TrainerConfig, TrialStatus
from kubetune_trainer import evaluate as evaluation
from kubetune_trainer import storage
from kubetune_trainer.tune_space import (
    TERMINATED,
    apply_params,
    asha_bounds,
    asha_milestones,
    grid_size,
    planned_steps,
    search_space,
    select_best,
    trial_config,
    trial_id_of,
    trial_run_uri,
)

log = logging.getLogger("kubetune_trainer")

ASHA_REDUCTION_FACTOR = 3
TRIAL_DRIVER_MEMORY = 128 * 1024**2  # Ray's logical memory resource of each trial's driver actor (bytes)


class TuningError(RuntimeError):
    """No trial produced a model."""


def run_tuning(cfg: TrainerConfig, prepared: Any, options: Any) -> dict[str, Any]:
    """Run spec.tuning's trials with Ray Tune, then make the best trial the job's result; returns a summary
    like train.fit's (step, totalSteps, stopReason, evalLoss, model) plus bestTrial, trials and evaluation."""
    from kubetune_trainer.data import s3_client
    from kubetune_trainer.status_reporter import Reporter
    from kubetune_trainer.tune_placement import Reclaimer
    from kubetune_trainer.tune_tracker import TrialTracker
    from kubetune_trainer.tune_verdicts import start_board

    tuning = cfg.spec.tuning
    assert tuning is not None
    client = s3_client(cfg.spec.dataset.endpoint, cfg.spec.dataset.region)
    metric, mode = tuning.objective.metric, tuning.objective.mode
    steps = planned_steps(apply_params(cfg.spec, {}, tuning.max_steps_per_trial), prepared.rows_per_shard)
    num_trials = grid_size(tuning) if tuning.algorithm == "grid" else tuning.trials

    reporter = Reporter(cfg, client, kubeconfig=options.kubeconfig)
    try:
        reporter.data(prepared.stats)
        board, board_name = start_board()
        tracker = TrialTracker(cfg, reporter, steps, num_trials, board)
        # A trial's workers wait for Tune's verdict at each ASHA rung (kubetune_trainer.tune_verdicts).
        verdicts = {
            "board": board_name,
            "milestones": asha_milestones(*asha_bounds(cfg, steps), ASHA_REDUCTION_FACTOR)
            if tuning.early_stopping == "asha"
            else [],
        }
        reporter.metric(
            {
                "event": "tuningStarted",
                "trials": num_trials,
                "algorithm": tuning.algorithm,
                "earlyStopping": tuning.early_stopping,
                "objective": {"metric": metric, "mode": mode},
                "stepsPerTrial": steps,
                "maxConcurrentTrials": tuning.max_concurrent_trials,
            }
        )
        tuner = restore_or_build_tuner(cfg, prepared, options, tracker, steps, verdicts)
        t0 = time.monotonic()
        with Reclaimer():
            grid = tuner.fit()
        trials = tracker.listing()
        best = select_best(trials, mode)
        if best is None:
            errors = [r.error for r in grid if r.error is not None]
            if errors and isinstance(errors[0], BaseException):
                raise errors[0]  # the entry point classifies it (data, config, training)
            first = next(iter(tracker.errors.values()), "")
            raise TuningError(
                f"no trial finished training ({', '.join(f'{t.id} {t.state}' for t in trials)})"
                + (f"; first error: {first.strip().splitlines()[-1]}" if first.strip() else "")
            )
        log.info(
            "tuning done in %.0fs: best %s %s=%s %s",
            time.monotonic() - t0,
            best.id,
            metric,
            best.objective,
            best.params,
        )
        artifact, summary, report = promote(client, cfg, best, trials, reporter)
        report_best(client, cfg, reporter, best, trials, artifact, summary, report, steps)
        reporter.metric(
            {
                "event": "tuningFinished",
                "bestTrial": best.id,
                metric: best.objective,
                "seconds": round(time.monotonic() - t0, 1),
            }
        )
    finally:
        reporter.close()
    return {
        "step": best.step,
        "totalSteps": steps,
        "stopReason": f"tuning: best of {len(trials)} trials is {best.id}",
        "evalLoss": (report.get("fineTuned") or {}).get("evalLoss"),
        "tokensPerSecond": None,
        "model": artifact.wire(),
        "bestTrial": best.id,
        "trials": [t.wire() for t in trials],
        "evaluation": summary.wire() if summary is not None else None,
    }


def experiment_storage(cfg: TrainerConfig) -> tuple[str, Any]:
    """Where Tune keeps its experiment state: (`bucket/key` of `<run>/tune`, a pyarrow S3FileSystem for the job's
    endpoint). In S3, not on the Ray head's disk, so that it outlives the driver and the RayCluster; under
    the run prefix, so that only this incarnation of the job ever restores it. Keys come from the environment
    (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, the job's Secret), as for boto3."""
    from urllib.parse import urlparse

    import pyarrow.fs

    from kubetune_trainer.data import parse_uri

    ds = cfg.spec.dataset
    kwargs: dict[str, Any] = {"region": ds.region}
    if ds.endpoint:
        url = urlparse(ds.endpoint)
        kwargs.update(endpoint_override=url.netloc, scheme=url.scheme or "https")
    bucket, key = parse_uri(f"{cfg.run_uri}/tune")
    return f"{bucket}/{key}", pyarrow.fs.S3FileSystem(**kwargs)


def experiment_name(cfg: TrainerConfig) -> str:
    return f"{cfg.job.namespace}-{cfg.job.name}-tune"


def restore_or_build_tuner(
    cfg: TrainerConfig, prepared: Any, options: Any, tracker: Any, steps: int, verdicts: dict[str, Any]
) -> Any:
    """A Tuner that continues this run's experiment when an earlier driver left one in S3, else a new one.
    `verdicts` tells the trials where Tune's verdicts are posted ({"board", "milestones"}, tune_verdicts)."""
    import ray.tune

    storage_path, fs = experiment_storage(cfg)
    path = f"{storage_path}/{experiment_name(cfg)}"
    if not ray.tune.Tuner.can_restore(path, storage_filesystem=fs):
        return build_tuner(cfg, prepared, options, tracker, steps, verdicts)
    tuning = cfg.spec.tuning
    assert tuning is not None
    tuner = ray.tune.Tuner.restore(
        path,
        trainable=_trainable(cfg, prepared, options, verdicts),
        param_space=search_space(tuning),
        resume_unfinished=True,
        resume_errored=True,
        restart_errored=False,
        storage_filesystem=fs,
    )
    # The restored run config holds the pickled tracker (without its reporter): report through this one.
    assert tuner._local_tuner is not None  # Tuner.restore in this process (not through Ray Client)
    tuner._local_tuner.get_run_config().callbacks = [tracker]
    kept = tracker.seed(ray.tune.ExperimentAnalysis(path, storage_filesystem=fs).trials)
    log.info(
        "restored the tuning experiment from s3://%s: %d finished trials kept (%s)",
        path,
        len(kept),
        ", ".join(kept) or "none",
    )
    tracker.reporter.metric({"event": "tuningRestored", "keptTrials": kept})
    return tuner


def _trainable(cfg: TrainerConfig, prepared: Any, options: Any, verdicts: dict[str, Any]) -> Any:
    """The trial function with the job's config, bound as Tune needs it (the same for build and restore)."""
    import ray.tune

    from kubetune_trainer.tune_trial import run_trial

    trainable = ray.tune.with_parameters(
        run_trial, job_config=cfg.wire(), prepared=asdict(prepared), options=asdict(options), verdicts=verdicts
    )
    # The trial actor only drives its Ray Train run (whose workers ask for their own resources): no CPU,
    # so trials x workers x CPU-per-worker is all a tuning job takes. Tune refuses an all-zero request,
    # and memory is a fair thing for a driver process to ask for.
    return ray.tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY})


def build_tuner(
    cfg: TrainerConfig, prepared: Any, options: Any, tracker: Any, steps: int, verdicts: dict[str, Any]
) -> Any:
    """The ray.tune.Tuner of spec.tuning: trials of tune_trial.run_trial, ASHA if asked, `tracker` reporting."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    tuning = cfg.spec.tuning
    assert tuning is not None
    scheduler = None
    if tuning.early_stopping == "asha":
        grace, max_t = asha_bounds(cfg, steps)
        scheduler = ASHAScheduler(
            time_attr="step",
            metric=tuning.objective.metric,
            mode=tuning.objective.mode,
            max_t=max_t,
            grace_period=grace,
            reduction_factor=ASHA_REDUCTION_FACTOR,
            stop_last_trials=False,
        )
    storage_path, fs = experiment_storage(cfg)
    return ray.tune.Tuner(
        _trainable(cfg, prepared, options, verdicts),
        param_space=search_space(tuning),
        tune_config=ray.tune.TuneConfig(
            num_samples=1 if tuning.algorithm == "grid" else tuning.trials,
            # maxConcurrentTrials goes to the search algorithm: Tune ignores TuneConfig.max_concurrent_trials
            # (with a warning) when it is given a BasicVariantGenerator of its own.
            search_alg=BasicVariantGenerator(
                random_state=cfg.spec.training.seed, max_concurrent=tuning.max_concurrent_trials
            ),
            scheduler=scheduler,
            trial_name_creator=lambda trial: trial_id_of(trial.trial_id),
            trial_dirname_creator=lambda trial: trial_id_of(trial.trial_id),
        ),
        run_config=ray.tune.RunConfig(
            name=experiment_name(cfg),
            storage_path=storage_path,  # S3: a retried driver restores the experiment (restore_or_build_tuner)
            storage_filesystem=fs,
            callbacks=[tracker],
            verbose=1,
        ),
    )


def report_best(
    client: Any,
    cfg: TrainerConfig,
    reporter: Any,
    best: TrialStatus,
    trials: list[TrialStatus],
    artifact: ModelArtifact,
    summary: EvaluationSummary | None,
    report: dict[str, Any],
    steps: int,
) -> None:
    """The job's status after tuning: trials, the best trial's checkpoints, model, evaluation, progress 100%."""
    from kubetune_trainer.tune_tracker import STATUS_TRIALS_LIMIT

    reporter.trials(trials[:STATUS_TRIALS_LIMIT], best.id)
    try:  # status.checkpoints: the best trial's (under <run>/trials/<id>/checkpoints)
        from kubetune_trainer import checkpoint as ckpt

        best_cfg = trial_config(cfg, best.id, dict(best.params))
        reporter.checkpoints(ckpt.apply_retention(client, best_cfg, best_cfg.spec.training.checkpoint.keep))
    except Exception as exc:  # noqa: BLE001 - informational
        log.warning("could not list the best trial's checkpoints (%s)", type(exc).__name__)
    reporter.model(artifact)
    if summary is not None:
        reporter.evaluation(summary)
    reporter.progress(
        step=best.step,
        total_steps=steps,
        eval_loss=(report.get("fineTuned") or {}).get("evalLoss"),
        percent=100,
        eta_seconds=0,
        trial=best.id,
    )


def promote(
    client: Any, cfg: TrainerConfig, best: TrialStatus, trials: list[TrialStatus], reporter: Any
) -> tuple[ModelArtifact, EvaluationSummary | None, dict[str, Any]]:
    """Make the best trial the job's result: its model (and merged model) to <run>/model (<run>/merged), its
    report with the trials table to <run>/eval/report.json, its training curve into <run>/metrics.jsonl."""
    src = trial_run_uri(cfg, best.id)
    lora = cfg.spec.training.method == "lora"
    copy_prefix(client, f"{src}/model", cfg.model_uri)
    artifact = ModelArtifact(
        uri=cfg.model_uri, kind="adapter" if lora else "full", base_uri=cfg.spec.model.uri if lora else None
    )
    if lora and cfg.spec.output.export_merged:
        copy_prefix(client, f"{src}/merged", f"{cfg.run_uri}/merged")
        artifact.merged_uri = f"{cfg.run_uri}/merged"
    report_uri = f"{cfg.eval_uri}/report.json"
    try:
        report = storage.get_json(client, f"{src}/eval/report.json")
    except Exception as exc:  # noqa: BLE001 - the model is what matters; the summary is then missing
        log.warning("the best trial's evaluation report is missing (%s)", type(exc).__name__)
        report = {}
    summary = None
    if report:
        report = copy.deepcopy(report)
        report["trialReportUri"] = f"{src}/eval/report.json"
        report["model"] = artifact.wire()
        report["bestTrial"] = best.id
        report["trials"] = [
            {**t.wire(), "reportUri": f"{trial_run_uri(cfg, t.id)}/eval/report.json" if t.state == TERMINATED else None}
            for t in trials
        ]
        storage.put_json(client, report_uri, report)
        summary = evaluation.summary(report, evaluation.objective_metric(cfg.spec), report_uri)
    raw = storage.get_bytes(client, f"{src}/metrics.jsonl") or b""
    for line in raw.decode().splitlines():
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "step" in record and "loss" in record and "event" not in record:
            reporter.metric({**record, "trial": best.id})
    log.info("promoted %s: model %s, report %s", best.id, cfg.model_uri, report_uri)
    return artifact, summary, report


def copy_prefix(client: Any, src_uri: str, dst_uri: str) -> int:
    """Server-side copy of every object under `src_uri` to `dst_uri` (whose old content is removed first)."""
    from kubetune_trainer.data.s3 import parse_uri

    objects = storage.list_keys(client, src_uri)
    if not objects:
        raise TuningError(f"nothing to promote under {src_uri}")
    storage.delete_prefix(client, dst_uri)
    src_bucket, _ = parse_uri(src_uri)
    dst_bucket, dst_key = parse_uri(dst_uri)
    for obj in objects:
        client.copy_object(
            Bucket=dst_bucket,
            Key=f"{dst_key.rstrip('/')}/{obj['rel']}",
            CopySource={"Bucket": src_bucket, "Key": obj["key"]},
        )
    return len(objects)
