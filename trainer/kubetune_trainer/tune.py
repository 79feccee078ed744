"""Hyperparameter search: Ray Tune trials of the same training, on the job's Ray cluster; the best one ships.

Ray 2.60 runs Ray Train V2, whose Tune integration is a Tune *function trainable* that builds and fits a
`TorchTrainer` for its trial (Ray's guide "Hyperparameter Tuning with Ray Tune"; passing a Trainer to
`ray.tune.Tuner` is the deprecated V1 way):

    driver (RayJob entrypoint)                    Tune trial actor (0 CPU)          Ray Train workers
    Tuner(_run_trial, param_space, ASHA) ---->    _run_trial(config):         ----> train.train_loop with the
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
  attribute, so trials are compared at the same step; grace period = one evaluation interval.
- Resources: each trial actor only drives its Ray Train run, so it asks for no CPU (only a little of Ray's
  logical memory: Tune refuses an empty request); the trial's workers ask for what a worker of the job asks for. `maxConcurrentTrials` bounds the trials (and Train runs) in flight:
  trials x workers x CPU-per-worker must fit the cluster, or Ray Train waits for resources.
- The best trial is the best objective among trials that finished (were trained to the end and exported):
  an early-stopped trial's figure is from an earlier step and it has no model. Its model, its report and its
  metrics become the job's (`<run>/model`, `<run>/eval/report.json` with a `trials` table, `<run>/metrics.jsonl`).
"""

from __future__ import annotations

import copy
import itertools
import json
import logging
import math
import os
import time
from dataclasses import asdict
from typing import Any

from kubetune.api import (
    TUNABLE_FIELDS,
    EvaluationSummary,
    FineTuneJobSpec,
    ModelArtifact,
    TrainerConfig,
    TrialStatus,
    TuningSpec,
)

from kubetune_trainer import evaluate as evaluation
from kubetune_trainer import storage

log = logging.getLogger("kubetune_trainer")

TRIALS_DIR = "trials"
STATUS_TRIALS_LIMIT = 100  # status.trials is for reading: at most this many entries (the report has them all)
ASHA_REDUCTION_FACTOR = 3
TRIAL_WORKER_START_TIMEOUT_S = 1800
TRIAL_DRIVER_MEMORY = 128 * 1024**2  # Ray's logical memory resource of each trial's driver actor (bytes)

PENDING, RUNNING, TERMINATED, EARLY_STOPPED, ERROR = "PENDING", "RUNNING", "TERMINATED", "EARLY_STOPPED", "ERROR"


class TuningError(RuntimeError):
    """No trial produced a model."""


# ------------------------------------------------------------------------------------------ pure parts


def search_space(tuning: TuningSpec) -> dict[str, Any]:
    """Tune's param_space for spec.tuning.searchSpace: {"params": {field: value or domain}}.

    Fields are taken in name order, as the API server returns them (it does not keep a map's key order), so
    a job samples the same trials from `kubetune run` and from the cluster. random: a domain per field
    (choice/uniform/loguniform/randint; integer fields stay integers; randint's high is inclusive, Tune's
    upper bound is not). grid: one `tune.grid_search` over every combination of the choice values like nested
    loops over the fields in name order (the last field varies fastest; each field's values in their order),
    so trial-00 is the first combination.
    """
    from ray import tune

    keys = sorted(tuning.search_space)
    if tuning.algorithm == "grid":
        values = [[_typed(k, v) for v in tuning.search_space[k].values or []] for k in keys]
        return {"params": tune.grid_search([dict(zip(keys, combo)) for combo in itertools.product(*values)])}
    space: dict[str, Any] = {}
    for key in keys:
        p = tuning.search_space[key]
        integer = TUNABLE_FIELDS[key] == "int"
        if p.type == "choice":
            space[key] = tune.choice([_typed(key, v) for v in p.values or []])
        elif p.type == "randint" or (integer and p.type == "uniform"):
            space[key] = tune.randint(int(math.ceil(p.low)), int(p.high) + 1)
        elif p.type == "loguniform":
            space[key] = (tune.lograndint(int(math.ceil(p.low)), int(p.high) + 1) if integer
                          else tune.loguniform(p.low, p.high))
        else:
            space[key] = tune.uniform(p.low, p.high)
    return {"params": space}


def _typed(key: str, value: float) -> int | float:
    return int(value) if TUNABLE_FIELDS[key] == "int" else float(value)


def grid_size(tuning: TuningSpec) -> int:
    return math.prod(len(p.values or []) for p in tuning.search_space.values())


def apply_params(spec: FineTuneJobSpec, params: dict[str, Any], max_steps: int | None) -> FineTuneJobSpec:
    """The spec a trial trains with: its parameters set on spec.training (dotted paths), the per-trial step
    budget, no tuning section. Validated again, so a sampled value breaks no field's own rule."""
    wire = spec.wire()
    wire.pop("tuning", None)
    training = wire.setdefault("training", {})
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = training
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = int(round(value)) if TUNABLE_FIELDS.get(key) == "int" else float(value)
    if max_steps is not None:
        training["maxSteps"] = max_steps
    return FineTuneJobSpec.model_validate(wire)


def trial_id_of(tune_trial_id: str) -> str:
    """`trial-07` for Tune's `<prefix>_00007` (BasicVariantGenerator numbers its trials from 0)."""
    tail = tune_trial_id.rsplit("_", 1)[-1]
    return f"trial-{int(tail):02d}" if tail.isdigit() else f"trial-{tune_trial_id}"


def trial_run_uri(cfg: TrainerConfig, trial_id: str) -> str:
    return f"{cfg.run_uri}/{TRIALS_DIR}/{trial_id}"


def trial_config(cfg: TrainerConfig, trial_id: str, params: dict[str, Any]) -> TrainerConfig:
    """The TrainerConfig of one trial: its spec, and its own run prefix."""
    assert cfg.spec.tuning is not None
    spec = apply_params(cfg.spec, params, cfg.spec.tuning.max_steps_per_trial)
    return TrainerConfig(job=cfg.job, spec=spec, run_uri=trial_run_uri(cfg, trial_id), reporting=cfg.reporting)


def planned_steps(spec: FineTuneJobSpec, rows_per_shard: int) -> int:
    """Optimizer steps a run of `spec` plans (train.train_loop's arithmetic), for progress and ASHA's horizon."""
    t = spec.training
    if t.max_steps:
        return t.max_steps
    micro = rows_per_shard // t.per_device_batch_size // t.gradient_accumulation_steps
    return max(1, math.ceil(t.epochs * micro))


def clean_params(params: dict[str, Any]) -> dict[str, float]:
    """Parameters as status shows them: integers for integer fields, 4 significant digits for floats."""
    out: dict[str, float] = {}
    for key, value in params.items():
        if TUNABLE_FIELDS.get(key) == "int":
            out[key] = int(round(value))
        else:
            out[key] = float(f"{float(value):.4g}")
    return out


def select_best(trials: list[TrialStatus], mode: str) -> TrialStatus | None:
    """The best finished trial (state TERMINATED, with an objective); ties go to the lower id."""
    done = [t for t in trials if t.state == TERMINATED and t.objective is not None and math.isfinite(t.objective)]
    if not done:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(done, key=lambda t: (sign * t.objective, t.id))


def trial_state(tune_status: str, last_result: dict[str, Any] | None) -> str:
    """Our state for a Tune trial: TERMINATED only when it trained to the end (its final result arrived);
    a trial Tune terminated earlier was stopped by the scheduler."""
    if tune_status == "ERROR":
        return ERROR
    if tune_status == "TERMINATED":
        return TERMINATED if (last_result or {}).get("final") else EARLY_STOPPED
    return RUNNING if tune_status == "RUNNING" else PENDING


# ------------------------------------------------------------------------------------- the trial actor


def _run_trial(config: dict[str, Any], *, job_config: dict[str, Any], prepared: dict[str, Any],
               options: dict[str, Any]) -> None:
    """A Tune trial (runs in its trial actor): fit one Ray Train run with the trial's parameters."""
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
    _claim_prefix(client, tcfg, params)
    fit(tcfg, PreparedData(**prepared), RunOptions(**options),
        trial={"id": trial_id, "params": clean_params(params), "jobRunUri": cfg.run_uri})


def _claim_prefix(client: Any, tcfg: TrainerConfig, params: dict[str, Any]) -> None:
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

    return RunConfig(name=f"{cfg.job.namespace}-{cfg.job.name}-{trial['id']}",
                     storage_path=options.ray_storage or None, callbacks=[TuneReportCallback()])


# ------------------------------------------------------------------------------------------- the driver


def _tracker_class() -> Any:
    from ray.tune import Callback

    class TrialTracker(Callback):
        """Keeps status.trials, progress.percent and metrics lines current as Tune reports (driver side)."""

        def __init__(self, cfg: TrainerConfig, reporter: Any, steps_per_trial: int, total_trials: int):
            self.cfg, self.reporter = cfg, reporter
            self.metric = evaluation.objective_metric(cfg.spec)
            self.steps_per_trial, self.total_trials = steps_per_trial, total_trials
            self.trials: dict[str, TrialStatus] = {}
            self.last: dict[str, dict[str, Any]] = {}
            self.errors: dict[str, Any] = {}

        def __getstate__(self) -> dict[str, Any]:
            # Tune pickles its run config (callbacks included) into the experiment folder; the reporter (an
            # API client, a thread) stays behind. Tune calls this very object, not an unpickled copy.
            return {**self.__dict__, "reporter": _NullReporter()}

        def _entry(self, trial: Any) -> TrialStatus:
            tid = trial_id_of(trial.trial_id)
            if tid not in self.trials:
                self.trials[tid] = TrialStatus(id=tid, params=clean_params((trial.config or {}).get("params", {})))
            return self.trials[tid]

        def on_trial_start(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            self._entry(trial).state = RUNNING
            self.reporter.metric({"event": "trialStarted", "trial": self._entry(trial).id,
                                  "params": self._entry(trial).params})
            self._publish()

        def on_trial_result(self, iteration: int, trials: list, trial: Any, result: dict, **info: Any) -> None:
            t = self._entry(trial)
            value = result.get(self.metric)
            # The final result carries `trainedSteps` instead of `step`, ASHA's time attribute: a trial that
            # trained to the end is not judged again (and killed mid-cleanup) on its final report.
            t.step = int(result.get("step") or result.get("trainedSteps") or 0)
            t.objective = float(value) if isinstance(value, (int, float)) else None
            t.state = RUNNING
            self.last[t.id] = {"step": t.step, "final": result.get("final"), self.metric: value}
            # Every evaluation of every trial, also of trials killed before their own metrics.jsonl was written
            # (kubetune plot --trials draws the held-out curves from these lines).
            figures = {k: result[k] for k in evaluation.METRIC_KEYS if isinstance(result.get(k), (int, float))}
            self.reporter.metric({"event": "trialResult", "trial": t.id, "step": t.step, **figures,
                                  "final": bool(result.get("final")), "stop": bool(result.get("done"))})
            self._publish()

        def on_trial_complete(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            t = self._entry(trial)
            t.state = trial_state("TERMINATED", self.last.get(t.id))
            self.reporter.metric({"event": "trialEnded", "trial": t.id, "state": t.state, "step": t.step,
                                  self.metric: t.objective})
            log.info("%s %s at step %s: %s %s", t.id, t.state, t.step, self.metric, t.objective)
            self._publish()

        def on_trial_error(self, iteration: int, trials: list, trial: Any, **info: Any) -> None:
            t = self._entry(trial)
            t.state = ERROR
            self.errors[t.id] = _error_text(trial)
            self.reporter.metric({"event": "trialEnded", "trial": t.id, "state": ERROR, "step": t.step,
                                  "error": self.errors[t.id].strip().splitlines()[-1:] or None})
            log.warning("%s failed:\n%s", t.id, self.errors[t.id][-4000:])
            self._publish()

        def listing(self) -> list[TrialStatus]:
            return [self.trials[k] for k in sorted(self.trials)]

        def _publish(self) -> None:
            mode = "max" if evaluation.higher_is_better(self.metric) else "min"
            best = select_best(self.listing(), mode)
            self.reporter.trials(self.listing()[:STATUS_TRIALS_LIMIT], best.id if best else None)
            ended = sum(1 for t in self.trials.values() if t.state in (TERMINATED, EARLY_STOPPED, ERROR))
            running = sum(min(t.step or 0, self.steps_per_trial) for t in self.trials.values() if t.state == RUNNING)
            done = ended * self.steps_per_trial + running
            total = max(1, self.total_trials * self.steps_per_trial)
            self.reporter.progress(percent=min(99, int(100 * done / total)))

    return TrialTracker


def _error_text(trial: Any) -> str:
    """What a failed trial raised (Tune keeps it in the trial's error file)."""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        if path and not str(path).endswith(".pkl"):
            with open(path) as fh:
                return fh.read()
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "unknown error")


class _NullReporter:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None


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
        pg = gcs_pb2.PlacementGroupTableData.FromString(raw)
        # A group made by a driver (Tune's own, for the trial actors) has a nil creator actor, which the GCS
        # counts as dead: only groups made by an actor (a Train controller) qualify.
        made_by_actor = bool(pg.creator_actor_id) and not ray.ActorID(pg.creator_actor_id).is_nil()
        if (pg.state == gcs_pb2.PlacementGroupTableData.CREATED and not pg.is_detached and made_by_actor
                and pg.creator_actor_dead and pg.creator_job_id.hex() == job):
            remove_placement_group(PlacementGroup(ray.PlacementGroupID(pg.placement_group_id)))
            removed += 1
    if removed:
        log.info("released %d placement group(s) of stopped trials", removed)
    return removed


class _Reclaimer:
    """Runs reclaim_orphaned_placement_groups every few seconds while Tune runs (driver side)."""

    def __init__(self, interval: float = 5.0):
        import threading

        self._stop = threading.Event()
        self._interval = interval
        self._thread = threading.Thread(target=self._run, name="kubetune-pg-reclaimer", daemon=True)

    def __enter__(self) -> _Reclaimer:
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


def run_tuning(cfg: TrainerConfig, prepared: Any, options: Any) -> dict[str, Any]:
    """Run spec.tuning's trials with Ray Tune, then make the best trial the job's result; returns a summary
    like train.fit's (step, totalSteps, stopReason, evalLoss, model) plus bestTrial, trials and evaluation."""
    import ray.tune
    from ray.tune.schedulers import ASHAScheduler
    from ray.tune.search.basic_variant import BasicVariantGenerator

    from kubetune_trainer.data import s3_client
    from kubetune_trainer.status_reporter import Reporter

    tuning = cfg.spec.tuning
    assert tuning is not None
    client = s3_client(cfg.spec.dataset.endpoint, cfg.spec.dataset.region)
    metric = tuning.objective.metric
    mode = tuning.objective.mode
    steps = planned_steps(apply_params(cfg.spec, {}, tuning.max_steps_per_trial), prepared.rows_per_shard)
    num_trials = grid_size(tuning) if tuning.algorithm == "grid" else tuning.trials

    reporter = Reporter(cfg, client, kubeconfig=options.kubeconfig)
    reporter.data(prepared.stats)
    tracker = _tracker_class()(cfg, reporter, steps, num_trials)
    reporter.metric({"event": "tuningStarted", "trials": num_trials, "algorithm": tuning.algorithm,
                     "earlyStopping": tuning.early_stopping, "objective": {"metric": metric, "mode": mode},
                     "stepsPerTrial": steps, "maxConcurrentTrials": tuning.max_concurrent_trials})

    scheduler = None
    if tuning.early_stopping == "asha":
        grace = max(1, min(cfg.spec.training.eval_interval_steps, steps))
        scheduler = ASHAScheduler(time_attr="step", metric=metric, mode=mode, max_t=max(steps, grace),
                                  grace_period=grace, reduction_factor=ASHA_REDUCTION_FACTOR,
                                  stop_last_trials=False)
    trainable = ray.tune.with_parameters(_run_trial, job_config=cfg.wire(), prepared=asdict(prepared),
                                         options=asdict(options))
    tuner = ray.tune.Tuner(
        # The trial actor only drives its Ray Train run (whose workers ask for their own resources): no CPU,
        # so trials x workers x CPU-per-worker is all a tuning job takes. Tune refuses an all-zero request,
        # and memory is a fair thing for a driver process to ask for.
        ray.tune.with_resources(trainable, {"CPU": 0, "memory": TRIAL_DRIVER_MEMORY}),
        param_space=search_space(tuning),
        tune_config=ray.tune.TuneConfig(
            num_samples=1 if tuning.algorithm == "grid" else tuning.trials,
            # maxConcurrentTrials goes to the search algorithm: Tune ignores TuneConfig.max_concurrent_trials
            # (with a warning) when it is given a BasicVariantGenerator of its own.
            search_alg=BasicVariantGenerator(random_state=cfg.spec.training.seed,
                                             max_concurrent=tuning.max_concurrent_trials),
            scheduler=scheduler,
            trial_name_creator=lambda trial: trial_id_of(trial.trial_id),
            trial_dirname_creator=lambda trial: trial_id_of(trial.trial_id),
        ),
        run_config=ray.tune.RunConfig(
            name=f"{cfg.job.namespace}-{cfg.job.name}-tune",
            storage_path=options.ray_storage or None,
            callbacks=[tracker],
            verbose=1,
        ),
    )
    t0 = time.monotonic()
    try:
        with _Reclaimer():
            grid = tuner.fit()
        trials = tracker.listing()
        best = select_best(trials, mode)
        if best is None:
            errors = [r.error for r in grid if r.error is not None]
            if errors and isinstance(errors[0], BaseException):
                raise errors[0]  # the entry point classifies it (data, config, training)
            first = next(iter(tracker.errors.values()), "")
            raise TuningError(f"no trial finished training ({', '.join(f'{t.id} {t.state}' for t in trials)})"
                              + (f"; first error: {first.strip().splitlines()[-1]}" if first.strip() else ""))
        log.info("tuning done in %.0fs: best %s %s=%s %s", time.monotonic() - t0, best.id, metric, best.objective,
                 best.params)
        artifact, summary, report = promote(client, cfg, best, trials, reporter)
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
        reporter.progress(step=best.step, total_steps=steps, eval_loss=(report.get("fineTuned") or {}).get("evalLoss"),
                          percent=100, eta_seconds=0, trial=best.id)
        reporter.metric({"event": "tuningFinished", "bestTrial": best.id, metric: best.objective,
                         "seconds": round(time.monotonic() - t0, 1)})
    finally:
        reporter.close()
    return {
        "step": best.step, "totalSteps": steps, "stopReason": f"tuning: best of {len(trials)} trials is {best.id}",
        "evalLoss": (report.get("fineTuned") or {}).get("evalLoss"), "tokensPerSecond": None,
        "model": artifact.wire(), "bestTrial": best.id, "trials": [t.wire() for t in trials],
        "evaluation": summary.wire() if summary is not None else None,
    }


def promote(client: Any, cfg: TrainerConfig, best: TrialStatus, trials: list[TrialStatus],
            reporter: Any) -> tuple[ModelArtifact, EvaluationSummary | None, dict[str, Any]]:
    """Make the best trial the job's result: its model (and merged model) to <run>/model (<run>/merged), its
    report with the trials table to <run>/eval/report.json, its training curve into <run>/metrics.jsonl."""
    src = trial_run_uri(cfg, best.id)
    lora = cfg.spec.training.method == "lora"
    copy_prefix(client, f"{src}/model", cfg.model_uri)
    artifact = ModelArtifact(uri=cfg.model_uri, kind="adapter" if lora else "full",
                             base_uri=cfg.spec.model.uri if lora else None)
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
        report["trials"] = [{**t.wire(), "reportUri": f"{trial_run_uri(cfg, t.id)}/eval/report.json"
                             if t.state == TERMINATED else None} for t in trials]
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
        client.copy_object(Bucket=dst_bucket, Key=f"{dst_key.rstrip('/')}/{obj['rel']}",
                           CopySource={"Bucket": src_bucket, "Key": obj["key"]})
    return len(objects)


__all__ = ["run_tuning", "search_space", "apply_params", "select_best", "trial_config", "trial_id_of"]
