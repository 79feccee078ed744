"""The training run: a Ray Train TorchTrainer whose workers train with DeepSpeed.

`fit` runs on the driver and launches `train_loop` on every worker. `train_loop` is a recipe (torchtune's
shape): a `Recipe` object whose methods are the stages, called in this order:

    setup            process group, seeds, S3, base model (node cache), this rank's data shard, DeepSpeed
                     engine, resume from the newest complete checkpoint, the reporter (rank 0), the base
                     model's evaluation (full fine-tunes; LoRA measures it at the end, adapters off); each
                     phase timed (status.startup: the time to first step)
    train            train_step (gradient_accumulation_steps micro-batches, no collective of its own) until the
                     planned steps or early stopping; evaluate_at_interval; sync_and_report (losses and tokens
                     of the steps since the last sync in one all-reduce, the preemption check, rank 0's
                     reports) about every SYNC_SECONDS and before evaluations' reports and checkpoints
    save_and_export  a final checkpoint, a final evaluation, the exported model, the evaluation report; every
                     checkpoint is written locally and uploaded in the background (checkpoint_upload), and
                     the final one's upload, overlapping the evaluation and the export, is waited for here
    finish           rank 0's summary and final status
    cleanup          (in `finally`) trace closed, reporter flushed, staging files removed

Data order is a pure function of (epoch, seed) (`batch_indices`), so a resumed run that knows its epoch and
micro-batch position consumes exactly the batches the uninterrupted run would have, and no record twice.
Every rank holds an equal-sized shard, so all ranks run the same number of steps (ZeRO needs that: each
step ends in a collective).
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

from kubetune.api import TrainerConfig
from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer import resize
from kubetune_trainer.checkpoint import TrainState
from kubetune_trainer.data import DataError, PreparedData, batch_indices, open_shard, s3_client
from kubetune_trainer.deepspeed_config import deepspeed_config, offload_applies, resolve_precision
from kubetune_trainer.layout import place, scaling_kwargs

log = logging.getLogger("kubetune_trainer")


@dataclass
class RunOptions:
    """How this run executes, as opposed to what it trains (that is the TrainerConfig)."""

    local: bool = False  # a Ray cluster started in-process on this machine, not KubeRay's
    model_cache: str = "/tmp/kubetune-models"  # node-local base model cache
    staging_dir: str = ""  # node-local scratch for checkpoint and export files ("" = system temp)
    ray_storage: str = ""  # Ray Train's run folder ("" = Ray's default)
    fail_after_step: int | None = None  # tests: raise after this step (after its checkpoint)
    trace_dir: str | None = None  # tests: each rank appends the rows of every micro-batch it trains on
    # Tests: each rank sleeps this long after every step, as a bigger model's steps would take, so that a fault
    # injected from outside (a drain, a kill) lands mid-run however fast the machine trains the tiny model.
    step_delay_s: float = 0.0
    kubeconfig: str | None = None  # the driver's KUBECONFIG, for status reports; None: in-cluster account
    # The driver's part of the time to first step: startedAt (epoch seconds), rayStartSeconds, dataSeconds,
    # fitStartedAt (set by fit); the workers add theirs and rank 0 reports them all (StartupTimes).
    startup: dict[str, float] = dataclasses.field(default_factory=dict)


# How long past a preemption deadline the workers wait for the node to go before training on (a cancelled drain).
PREEMPTION_SLACK_S = 60.0


class InjectedFailure(RuntimeError):
    """Raised on purpose (KUBETUNE_FAIL_AFTER_STEP) to test resuming."""


# ------------------------------------------------------------------------------------------- driver


def fit(
    cfg: TrainerConfig, prepared: PreparedData, options: RunOptions, trial: dict[str, Any] | None = None
) -> dict[str, Any]:
    """Run the training on the Ray cluster; returns rank 0's summary. Raises ray's TrainingFailedError.

    `trial` ({"id", "params", "jobRunUri"}) when this run is a Ray Tune trial (kubetune_trainer.tune_trial)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    options.startup["fitStartedAt"] = time.time()  # workers measure how long Ray Train took to start them
    resources = cfg.spec.resources
    use_gpu = resources.gpus_per_worker > 0
    run_config = RunConfig(name=f"{cfg.job.namespace}-{cfg.job.name}", storage_path=options.ray_storage or None)
    if trial is not None:  # a tuning trial: its own run name, its evaluations forwarded to Tune
        from kubetune_trainer.tune_trial import trial_run_config

        run_config = trial_run_config(cfg, options, trial)
    # Recovery inside the Ray cluster: a lost worker or a preempted node restarts the worker group, which
    # resumes from the newest complete checkpoint in S3 (Recipe._resume); see kubetune_trainer.restarts.
    run_config.failure_config = failure_config(cfg)
    # Ray Train v2 (RAY_TRAIN_V2_ENABLED) throughout this function: mypy resolves ray.train's names to the v1 API,
    # whose TorchTrainer wants a loop returning None, whose Result has no return_value and whose FailureConfig no
    # max_preemption_failures.
    trainer = TorchTrainer(
        train_loop,  # type: ignore[arg-type]  # v2 takes a loop returning Any (see above)
        train_loop_config={
            "config": cfg.wire(),
            "prepared": dataclasses.asdict(prepared),
            "options": dataclasses.asdict(options),
            "trial": trial,
            "driverId": uuid.uuid4().hex,  # the same for every worker-group restart of this driver
        },
        # One rank per GPU, a pod's ranks packed onto it (kubetune_trainer.layout).
        scaling_config=ScalingConfig(**scaling_kwargs(resources, options.local)),
        # NCCL between GPUs; gloo on CPU (DeepSpeed reuses this process group).
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=run_config,
    )
    result = trainer.fit()
    return result.return_value or {}  # type: ignore[attr-defined]  # v2's Result (see fit)


def failure_config(cfg: TrainerConfig) -> Any:
    """Ray Train's FailureConfig from spec.training.maxWorkerRestarts / maxPreemptionRestarts."""
    from ray.train import FailureConfig

    training = cfg.spec.training
    return FailureConfig(  # type: ignore[call-arg]  # v2's FailureConfig; mypy sees v1's (see fit)
        max_failures=training.max_worker_restarts, max_preemption_failures=training.max_preemption_restarts
    )


# ------------------------------------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker's whole run: the recipe's steps in order, cleanup always (see the module docstring)."""
    recipe = Recipe(loop_config)
    try:
        recipe.setup()
        recipe.train()
        if not recipe.tuner_stopped:  # a trial Tune stopped has no model: its workers just end
            recipe.save_and_export()
        return recipe.finish()
    except BaseException as exc:
        recipe.report_failure(exc)
        raise
    finally:
        recipe.cleanup()


# The ranks exchange the loss and token counts of their steps (one all-reduce) and check for preemption (a Ray
# barrier) about every SYNC_SECONDS of training, at most every MAX_SYNC_STEPS steps, and always before an
# evaluation's report, a checkpoint and the end. A step of a small model takes milliseconds: a collective
# after each one would cost the bare loop's throughput several percent for figures nobody reads that fast.
SYNC_SECONDS = 2.0
MAX_SYNC_STEPS = 100
# How long a failed attempt's cleanup lets a checkpoint upload in flight finish (S3 outages are waited for longer
# while training runs: kubetune_trainer.storage).
UPLOAD_CLOSE_S = 60.0


@dataclass
class StepResult:
    """One optimizer step's figures. `loss` and `tokens` are over all ranks once the step is synced."""

    step: int
    epoch: float  # fractional epoch after the step
    seconds: float  # wall time of the step on this rank
    cpu_seconds: float  # CPU time of this rank's process during the step
    lr: float
    local_loss: Any  # this rank's mean loss over its micro-batches (a device scalar: no host sync per step)
    local_tokens: int  # this rank's real (non-padding) tokens
    loss: float | None = None  # mean over ranks (after sync)
    tokens: int = 0  # all ranks' real tokens (after sync)


class Recipe:
    """The state one worker carries through setup, training, saving and cleanup; one method per stage.

    Methods are called in the order of `train_loop`; every rank calls every method (each step, evaluation,
    checkpoint and export contains collectives). Only rank 0 has a reporter.
    """

    def __init__(self, loop_config: dict[str, Any]):
        import ray.train

        self.cfg = TrainerConfig.model_validate(loop_config["config"])
        self.prepared = PreparedData(**loop_config["prepared"])
        self.opts = RunOptions(**loop_config["options"])
        self.driver_id: str = loop_config.get("driverId") or ""  # same across Ray Train's worker-group restarts
        self.preempt_checkpointed = False  # a just-in-time checkpoint was written for a preemption notice
        self.preemption_deadline: float | None = None  # when the preempted node goes (epoch seconds)
        self.restarts: list[Any] = []  # this run's restarts (kubetune_trainer.restarts), rank 0
        self.restarted = False  # this start is a restart (rank 0)
        self.trial: dict[str, Any] | None = loop_config.get("trial")  # a tuning trial (kubetune_trainer.tune_trial)
        # ASHA's rungs this attempt has still to pass, and whether Tune stopped the trial at one (tune_verdicts).
        self.pending_rungs: list[int] = sorted((self.trial or {}).get("milestones") or [])
        self.tuner_stopped = False
        self.spec, self.training = self.cfg.spec, self.cfg.spec.training
        ctx = ray.train.get_context()
        self.rank, self.world = ctx.get_world_rank(), ctx.get_world_size()
        # This rank's pod and local rank (emulated pods on a single-node Ray; kubetune_trainer.layout).
        self.place = place(
            self.cfg.spec.resources,
            world_rank=self.rank,
            world=self.world,
            local_rank=ctx.get_local_rank(),
            local_world=ctx.get_local_world_size(),
            node_rank=ctx.get_node_rank(),
        )
        self.t_start = time.monotonic()
        self.t_init_wall = time.time()
        # Time to first step, by phase (StartupTimes wire names): the driver's figures, then this worker's.
        self.startup: dict[str, float] = {k: v for k, v in self.opts.startup.items() if k.endswith("Seconds")}
        self.use_gpu = self.spec.resources.gpus_per_worker > 0
        self.classification = self.spec.model.task == "sequence-classification"
        self.lora = self.training.method == "lora"
        self.dpo: Any = None  # kubetune_trainer.preference.Dpo when training.objective is dpo
        self.preference_metrics: dict[str, float] = {}  # the latest held-out DPO figures (status.progress)
        self.state = TrainState(world_size=self.world, data_fingerprint=self.prepared.fingerprint)
        self.staging: Path | None = None
        self.uploads: Any = None  # this rank's background checkpoint uploader (kubetune_trainer.checkpoint_upload)
        self.trace: Any = None
        self.reporter: Any = None
        self.evaluator: Any = None
        self.eval_data: dict[str, Any] | None = None
        self.eval_rows = 0
        self.resumed_from: str | None = None
        self.artifact: Any = None
        self.evaluation: Any = None
        # Throughput and ETA count only training steps of this attempt (not evaluation, checkpoints or setup).
        self.train_seconds, self.attempt_tokens, self.attempt_start_step = 0.0, 0, 0
        self.last_checkpoint_step: int | None = None
        self.checkpoint_seconds: dict[int, float] = {}  # step -> seconds the training thread spent on its checkpoint
        self.stop_reason: str | None = None
        self.peak_memory_mb: list[float] = []  # every rank's peak (kubetune_trainer.memory), after export
        self.phase_seconds: dict[str, float] = {}  # eval, checkpoint, export, evaluationReport (after setup)
        self.unsynced: list[StepResult] = []  # steps whose cross-rank figures are not exchanged yet
        self.carried_seconds = 0.0  # reporting time after a step, counted into the next step's time
        self.next_sync_step = 0  # the next step that syncs even without an evaluation or a checkpoint

    # ---------------------------------------------------------------- setup

    def setup(self) -> None:
        """Process group and device, the base model, this rank's data, the DeepSpeed engine, the checkpoint
        to resume from, and (rank 0) the reporter and the base model's evaluation."""
        _worker_logging(self.rank)
        fit_started = self.opts.startup.get("fitStartedAt")
        if fit_started:
            self.startup["workerStartSeconds"] = round(self.t_init_wall - fit_started, 2)
        with self._timed("deepspeedInitSeconds"):
            self._setup_device()
        with self._timed("modelLoadSeconds"):
            self._setup_model()
        with self._timed("dataSeconds"):
            self._setup_data()
        with self._timed("deepspeedInitSeconds"):
            self._setup_engine()
        if self.training.objective == "dpo":
            self._setup_dpo()  # before _resume: the engine still holds the base, the reference model
        with self._timed("resumeSeconds"):
            self._resume()
        self._setup_reporting()  # times the base model's evaluation itself

    @contextlib.contextmanager
    def _timed(self, key: str, into: dict[str, float] | None = None) -> Iterator[None]:
        """Adds the block's seconds to into[key] (default: startup, the figures of status.startup)."""
        into = self.startup if into is None else into
        t0 = time.monotonic()
        try:
            yield
        finally:
            into[key] = round(into.get(key, 0.0) + time.monotonic() - t0, 2)

    def _setup_device(self) -> None:
        import torch

        self.deepspeed = _import_deepspeed(self.use_gpu)
        self.deepspeed.init_distributed(dist_backend="nccl" if self.use_gpu else "gloo")  # Ray's process group
        # Ray gives each worker its own GPU(s) through CUDA_VISIBLE_DEVICES: get_device() knows which index.
        if self.use_gpu:
            import ray.train.torch

            self.device = ray.train.torch.get_device()
            torch.cuda.set_device(self.device)
        else:
            self.device = torch.device("cpu")
        self.precision = resolve_precision(self.training.precision, self.use_gpu)
        if self.training.deepspeed.offload == "cpu" and not offload_applies(self.training, self.use_gpu):
            log.info("deepspeed.offload=cpu has no effect on a CPU-only run; everything is in host memory already")
        if self.opts.staging_dir:  # a folder on a scratch volume need not exist yet
            os.makedirs(self.opts.staging_dir, exist_ok=True)
        self.staging = Path(
            tempfile.mkdtemp(prefix=f"kubetune-{self.cfg.job.name}-rank{self.rank}-", dir=self.opts.staging_dir or None)
        )
        log.info("rank %d of %d: %s, device %s", self.rank, self.world, self.place.describe(), self.device)

    def _setup_model(self) -> None:
        from kubetune_trainer import model as model_lib

        _seed_all(self.training.seed)  # identical on every rank: the new weights (LoRA, heads) must start equal
        self.client = s3_client(self.spec.dataset.endpoint, self.spec.dataset.region)
        cache = Path(self.opts.model_cache)
        if self.place.emulated:  # each emulated pod has a node cache of its own, as a real pod has its disk
            cache = cache / f"pod-{self.place.pod}"
        self.base_dir = model_lib.fetch_base(self.spec, self.client, cache)
        self.tokenizer = model_lib.load_tokenizer(self.spec, self.base_dir)
        # Built before the model: with ZeRO-3 the model is partitioned across the ranks as it loads.
        self.ds_config = deepspeed_config(self.training, world_size=self.world, use_gpu=self.use_gpu)
        self.model = model_lib.load_model(
            self.spec,
            self.base_dir,
            precision=self.precision,
            pad_token_id=self.tokenizer.pad_token_id,
            ds_config=self.ds_config,
            use_gpu=self.use_gpu,
        )

    def _setup_data(self) -> None:
        prepared, training = self.prepared, self.training
        if len(prepared.train_shards) != self.world:
            raise DataError(f"the data was prepared in {len(prepared.train_shards)} shards for {self.world} workers")
        # This rank's shards only, train and held-out, streamed a row group at a time into local memory maps
        # (never held whole): the held-out rows are cut in as many shards as there are ranks, each evaluated by
        # its own rank, so no rank downloads another's.
        scratch = str(self.staging) if self.staging else None
        self.train_data = open_shard([prepared.train_shards[self.rank]], self.client, scratch)
        validation = prepared.validation_shards
        if validation and len(validation) != self.world:
            raise DataError(f"the held-out data was prepared in {len(validation)} shards for {self.world} workers")
        self.eval_data = open_shard([validation[self.rank]], self.client, scratch) if validation else None
        self.eval_rows = prepared.num_validation_sequences  # over all ranks
        if self.eval_data is not None:
            log.info(
                "rank %d: held-out rows %d of %d (%s)",
                self.rank,
                len(self.eval_data["input_ids"]),
                self.eval_rows,
                validation[self.rank].rsplit("/", 1)[-1],
            )
        self.num_rows = len(self.train_data["input_ids"])
        batch, accum = training.per_device_batch_size, training.gradient_accumulation_steps
        # An incomplete accumulation group at the end of an epoch is dropped, so that every optimizer step
        # starts on an epoch-aligned group and a checkpoint position is always (epoch, micro_batch).
        self.micro_per_epoch = len(batch_indices(self.num_rows, batch, 0, training.seed)) // accum * accum
        self.steps_per_epoch = self.micro_per_epoch // accum
        if self.steps_per_epoch == 0:
            raise DataError(
                f"each worker has {self.num_rows} training sequences, fewer than one optimizer step needs "
                f"({batch} x {accum}); add data or lower perDeviceBatchSize / gradientAccumulationSteps"
            )
        self.total_steps = training.max_steps or max(1, math.ceil(training.epochs * self.steps_per_epoch))
        self._epoch_batches: list[Any] = []
        self._epoch_of_batches = -1

    def _setup_engine(self) -> None:
        training, total_steps = self.training, self.total_steps
        self.engine, _, _, self.scheduler = self.deepspeed.initialize(
            model=self.model,
            model_parameters=[p for p in self.model.parameters() if p.requires_grad],
            config=self.ds_config,
            lr_scheduler=lambda optimizer: _lr_schedule(optimizer, training, total_steps),
        )

    def _setup_dpo(self) -> None:
        """DPO's reference: LoRA's base is the engine with its adapters off, at any time; a full fine-tune's
        is only there now, so the reference log-probabilities of every row the run will use are taken now."""
        import numpy as np

        from kubetune_trainer.preference import Dpo, eval_batches

        training, batch = self.training, self.training.per_device_batch_size
        self.dpo = Dpo(training.dpo.beta if training.dpo else 0.1, self.lora, self.device)
        if self.lora:
            return
        micro = self.total_steps * training.gradient_accumulation_steps
        epochs = math.ceil(micro / self.micro_per_epoch)
        planned = [batch_indices(self.num_rows, batch, e, training.seed)[: self.micro_per_epoch] for e in range(epochs)]
        used = np.unique(np.concatenate([b for per_epoch in planned for b in per_epoch][:micro]))
        self.dpo.precompute(self.engine, "train", self.train_data, used, batch)
        if self.eval_data is not None:
            rows = np.concatenate(
                eval_batches(
                    len(self.eval_data["input_ids"]),
                    self.eval_rows,
                    world=self.world,
                    batch=batch,
                    max_batches=training.max_eval_batches,
                )
            )
            self.dpo.precompute(self.engine, "eval", self.eval_data, rows, batch)

    def _resume(self) -> None:
        """Every rank resumes from the newest complete checkpoint rank 0 finds (or starts fresh)."""
        import torch.distributed as dist

        from kubetune_trainer.checkpoint_upload import Uploads

        latest = [ckpt.find_latest(self.client, self.cfg) if self.rank == 0 else None]
        if self.rank == 0:  # before the broadcast: no rank saves before the debris of dead attempts is gone
            ckpt.discard_after(self.client, self.cfg, latest[0])
        dist.broadcast_object_list(latest, src=0)
        self.resumed_from = latest[0]
        on_complete = self._checkpoint_complete if self.rank == 0 else None
        self.uploads = Uploads.for_worker_group(self.client, rank=self.rank, world=self.world, on_complete=on_complete)
        if self.resumed_from:
            assert self.staging is not None
            written = resize.written_state(self.client, self.resumed_from)
            if written.world_size != self.world:  # written by another number of ranks (kubetune_trainer.resize)
                self.state = resize.load_resized(
                    self.engine,
                    self.resumed_from,
                    written,
                    rank=self.rank,
                    world=self.world,
                    client=self.client,
                    staging=self.staging,
                    exclude_frozen=self.lora,
                    zero_stage=self.training.deepspeed.zero_stage,
                    fingerprint=self.prepared.fingerprint,
                )
            else:
                self.state = ckpt.load(
                    self.engine,
                    self.resumed_from,
                    rank=self.rank,
                    world_size=self.world,
                    client=self.client,
                    staging=self.staging,
                    exclude_frozen=self.lora,
                )
            if self.state.data_fingerprint != self.prepared.fingerprint:
                log.warning(
                    "resuming %s, whose data fingerprint differs from this run's: the data or its "
                    "preprocessing changed, so the data position is only approximate",
                    self.resumed_from,
                )
            log.info(
                "resumed from %s at step %d (epoch %d, micro-batch %d)",
                self.resumed_from,
                self.state.step,
                self.state.epoch,
                self.state.micro_batch,
            )
            self.last_checkpoint_step = self.state.step
        else:
            _seed_all(self.training.seed + 1 + self.rank)  # dropout differs between ranks (data, masks)
        if self.rank == 0:
            from kubetune_trainer import restarts

            self.restarts, self.restarted = restarts.record_start(
                self.client,
                self.cfg,
                driver_id=self.driver_id,
                resumed_step=self.state.step,
                resumed_from=self.resumed_from,
                trial=(self.trial or {}).get("id"),
            )
        self.attempt_start_step = self.state.step
        self.stop_reason = self.state.stop_reason or ("max steps" if self.state.step >= self.total_steps else None)

    def _setup_reporting(self) -> None:
        """Rank 0's reporter, the rows trace (tests), and the base model's figures on the held-out data."""
        from kubetune_trainer.status_reporter import Reporter

        state = self.state
        if self.rank == 0:
            self.reporter = Reporter(
                self.cfg,
                self.client,
                resumed_step=state.step if self.resumed_from else None,
                kubeconfig=self.opts.kubeconfig,
            )
            self.reporter.data(self.prepared.stats)
            self.reporter.restarts(self.restarts)
            if self.restarted:
                self.reporter.metric({"event": "restart", **self.restarts[-1].wire()})
            self.reporter.metric(
                {
                    "event": "start",
                    "step": state.step,
                    "totalSteps": self.total_steps,
                    "worldSize": self.world,
                    "stepsPerEpoch": self.steps_per_epoch,
                    "resumedFrom": self.resumed_from,
                }
            )
        if self.opts.trace_dir:
            self.trace = open(Path(self.opts.trace_dir) / f"rank-{self.rank}.jsonl", "a")  # noqa: SIM115 - closed by cleanup()
        if self.eval_data is not None:
            from kubetune_trainer.evaluate import Evaluator

            self.evaluator = Evaluator(
                self.cfg,
                self.client,
                self.tokenizer,
                self.eval_data,
                total_rows=self.eval_rows,
                rank=self.rank,
                device=self.device,
                lora=self.lora,
                zero_stage=self.training.deepspeed.zero_stage,
                classification=self.classification,
                data_fingerprint=self.prepared.fingerprint,
                evaluate=self.evaluate,
                trial=self.trial,
            )
            # LoRA leaves the base weights untouched: the base model is measured after training, with the
            # adapters switched off, so the first step comes sooner. A full fine-tune must measure it now.
            if not self.lora:
                with self._timed("baseEvalSeconds"):
                    self.evaluator.base(self.engine, state.step)
        if self.reporter and self.trial:
            self.reporter.for_trial(self.trial["id"])

    # ---------------------------------------------------------------- train

    def train(self) -> None:
        """Optimizer steps until the planned steps are done or early stopping says so; evaluation, reports and
        checkpoints at their intervals."""
        training = self.training
        log.info(
            "training %d steps (%d per epoch, %d sequences per worker, %d workers, ZeRO-%d, %s, %s); setup took %.1fs",
            self.total_steps,
            self.steps_per_epoch,
            self.num_rows,
            self.world,
            training.deepspeed.zero_stage,
            training.method,
            self.precision,
            time.monotonic() - self.t_start,
        )
        while self.stop_reason is None:
            step = self.train_step()
            state = self.state
            if state.step == self.attempt_start_step + 1:
                t0 = time.perf_counter()
                self.report_startup(step)
                self.carried_seconds += time.perf_counter() - t0
            if state.step >= self.total_steps:
                self.stop_reason = "max steps" if training.max_steps else "epochs"
            eval_metrics = self.evaluate_at_interval()
            state.stop_reason = self.stop_reason  # saved with the checkpoint: a finished run is not continued
            checkpoint_due = (
                state.step % training.checkpoint.interval_steps == 0 or self.stop_reason is not None
            ) and not self.tuner_stopped
            # Every input of this decision is the same on every rank, so all ranks sync at the same steps.
            synced = (
                checkpoint_due
                or bool(eval_metrics)
                or state.step >= self.next_sync_step
                or state.step == self.opts.fail_after_step
            )
            preempted = synced and self.sync_and_report(eval_metrics)
            if checkpoint_due or preempted:
                self.checkpoint()  # just in time on a preemption notice: a restart redoes at most a sync interval
            if preempted:
                self._preempted()
            if self.opts.fail_after_step is not None and state.step == self.opts.fail_after_step:
                self.uploads.drain()  # "after its checkpoint": complete in S3
                raise InjectedFailure(f"injected failure after step {state.step} (KUBETUNE_FAIL_AFTER_STEP)")

    def _preemption_notice(self) -> bool:
        """Whether a node of this worker group is being preempted or drained (first notice only).

        ray.train.get_preemption_info is a barrier (a Ray actor call): every rank calls it at the same steps, the
        sync steps (see SYNC_SECONDS).
        """
        import ray.train

        info = ray.train.get_preemption_info()
        if info is None or self.preempt_checkpointed:
            return False
        log.warning(
            "preemption notice for ranks %s (deadline %s ms): writing a just-in-time checkpoint at step %d",
            info.preempted_ranks,
            info.deadline_ms,
            self.state.step,
        )
        self.preemption_deadline = info.deadline_ms / 1000 if info.deadline_ms else None
        return True

    def _preempted(self) -> None:
        """After the just-in-time checkpoint: rank 0 records that the next start is a preemption restart."""
        self.preempt_checkpointed = True
        with self._timed("checkpoint", self.phase_seconds):
            self.uploads.drain()  # the just-in-time checkpoint is in S3 before the node goes
        if self.rank == 0:
            from kubetune_trainer import restarts

            restarts.mark_preempted(self.client, self.cfg)
            if self.reporter:
                self.reporter.metric({"event": "preempted", "step": self.state.step})
        # Steps trained after the checkpoint would be lost with the node: wait for the deadline instead (Ray
        # Train then restarts the worker group elsewhere); a notice that came to nothing lets training go on.
        while self.preemption_deadline is not None and time.time() < self.preemption_deadline + PREEMPTION_SLACK_S:
            time.sleep(1.0)

    def report_startup(self, first: StepResult) -> None:
        """Rank 0, after the first step of this attempt: where the time before it went (status.startup, a
        metrics line, the log). A worker-group restart has no driver start of its own to count from."""
        self.startup["firstStepSeconds"] = round(first.seconds, 2)
        started = self.opts.startup.get("startedAt")
        if self.restarted:
            self.startup.pop("workerStartSeconds", None)
        elif started:
            self.startup["timeToFirstStepSeconds"] = round(time.time() - started, 2)
        if self.reporter:
            self.reporter.startup(self.startup)
            self.reporter.metric({"event": "startup", "step": self.state.step, **self.startup})
            log.info(
                "time to first step: %s", ", ".join(f"{k[: -len('Seconds')]} {v:.1f}s" for k, v in self.startup.items())
            )

    def _next_rows(self) -> Any:
        """The rows of this rank's next micro-batch (data order is a pure function of epoch and seed)."""
        state = self.state
        if self._epoch_of_batches != state.epoch:
            self._epoch_batches = []
            if state.resized and state.resized["epoch"] == state.epoch:  # the rest of an epoch begun on other ranks
                self._epoch_batches = resize.resized_epoch(
                    self.train_data["input_ids"],
                    state,
                    run_uri=self.cfg.run_uri,
                    batch=self.training.per_device_batch_size,
                    accum=self.training.gradient_accumulation_steps,
                    seed=self.training.seed,
                    client=self.client,
                )
                if not self._epoch_batches:  # the old ranks had consumed all of it
                    state.epoch, state.micro_batch = state.epoch + 1, 0
            if not self._epoch_batches:
                self._epoch_batches = batch_indices(
                    self.num_rows, self.training.per_device_batch_size, state.epoch, self.training.seed
                )[: self.micro_per_epoch]
            self._epoch_of_batches = state.epoch
        return self._epoch_batches[state.micro_batch]

    def train_step(self) -> StepResult:
        """One optimizer step: gradient_accumulation_steps micro-batches. No collective besides DeepSpeed's own:
        the loss and token counts are exchanged later, for several steps at once (sync_and_report)."""
        import torch

        state, engine, accum = self.state, self.engine, self.training.gradient_accumulation_steps
        t0, cpu0 = time.perf_counter(), time.process_time()
        loss_sum = torch.zeros((), dtype=torch.float64, device=self.device)
        tokens = 0
        for _ in range(accum):
            rows = self._next_rows()
            inputs = _to_tensors(self.train_data, rows, self.device, self.classification)
            loss = self.dpo.train_loss(engine, self.train_data, rows) if self.dpo else engine(**inputs).loss
            engine.backward(loss)
            engine.step()  # applies the update (and steps the LR schedule) on the accumulation boundary
            loss_sum += loss.detach().double()  # on the device: no host sync per micro-batch
            tokens += int(self.train_data["attention_mask"][rows].sum())  # real tokens, counted on the host
            if self.trace:
                self.trace.write(
                    json.dumps(
                        {
                            "step": state.step + 1,
                            "epoch": state.epoch,
                            "micro": state.micro_batch,
                            "rows": [int(r) for r in rows],
                            "pod": self.place.pod,
                            "localRank": self.place.local_rank,
                        }
                    )
                    + "\n"
                )
                self.trace.flush()
            state.micro_batch += 1
        if self.opts.step_delay_s:  # inside the step's time: the sync schedule must see slow steps as slow
            time.sleep(self.opts.step_delay_s)
        state.step += 1
        if state.micro_batch >= len(self._epoch_batches):  # micro_per_epoch, or a resized epoch's rest
            state.epoch, state.micro_batch = state.epoch + 1, 0
        seconds, self.carried_seconds = time.perf_counter() - t0 + self.carried_seconds, 0.0
        result = StepResult(
            step=state.step,
            epoch=round(state.epoch + state.micro_batch / self.micro_per_epoch, 4),
            seconds=seconds,
            cpu_seconds=time.process_time() - cpu0,
            lr=self.scheduler.get_last_lr()[0],
            local_loss=loss_sum / accum,
            local_tokens=tokens,
        )
        state.samples += self.training.per_device_batch_size * accum * self.world
        self.train_seconds += result.seconds
        self.unsynced.append(result)
        return result

    def sync_and_report(self, eval_metrics: dict[str, float]) -> bool:
        """One all-reduce for the steps since the last sync (their losses and token counts over all ranks) and
        the preemption check, then rank 0 reports the steps; sets the next sync about SYNC_SECONDS of training
        ahead. Returns whether a preemption notice arrived. The time this takes counts as training time (the
        last step's, and the reporting the next step's), so tokens/s includes it."""
        import torch
        import torch.distributed as dist

        t0 = time.perf_counter()
        steps, self.unsynced = self.unsynced, []
        if not steps:
            return False
        n = len(steps)
        # Rank 0's mean step time rides along (the others add 0), so every rank derives the same interval.
        mean_seconds = sum(s.seconds for s in steps) / n if self.rank == 0 else 0.0
        host = torch.tensor([float(s.local_tokens) for s in steps] + [mean_seconds], dtype=torch.float64)
        flat = torch.cat([torch.stack([s.local_loss for s in steps]).to(torch.float64), host.to(self.device)])
        dist.all_reduce(flat)
        values = flat.tolist()
        for i, s in enumerate(steps):
            s.loss, s.tokens = values[i] / self.world, int(values[n + i])
        self.next_sync_step = self.state.step + max(1, min(MAX_SYNC_STEPS, round(SYNC_SECONDS / max(values[-1], 1e-6))))
        preempted = self._preemption_notice()
        synced_seconds = time.perf_counter() - t0
        steps[-1].seconds += synced_seconds
        self.train_seconds += synced_seconds
        t0 = time.perf_counter()
        self.report_steps(steps, eval_metrics)
        self.carried_seconds += time.perf_counter() - t0
        return preempted

    # ---------------------------------------------------------------- evaluate

    def evaluate(self) -> dict[str, float]:
        """Loss and perplexity (accuracy for classification; DPO's loss, preference accuracy and reward margin)
        on the held-out rows, over all ranks."""
        if self.dpo:
            assert self.eval_data is not None
            return cast(  # self.dpo is a preference.Dpo (typed Any here)
                "dict[str, float]",
                self.dpo.evaluate(
                    self.engine,
                    self.eval_data,
                    total=self.eval_rows,
                    world=self.world,
                    batch=self.training.per_device_batch_size,
                    max_batches=self.training.max_eval_batches,
                ),
            )
        return _evaluate(
            self.engine,
            self.eval_data,
            total=self.eval_rows,
            world=self.world,
            batch=self.training.per_device_batch_size,
            device=self.device,
            max_batches=self.training.max_eval_batches,
            classification=self.classification,
        )

    def evaluate_at_interval(self) -> dict[str, float]:
        """Evaluate every evalIntervalSteps and at the last step; updates early stopping (and, in a tuning
        trial, tells Tune, whose scheduler decides on it)."""
        state = self.state
        if self.eval_data is None or (state.step % self.training.eval_interval_steps and not self.stop_reason):
            return {}
        with self._timed("eval", self.phase_seconds):
            metrics = self.evaluate()
        state.last_eval_loss, state.last_eval_step = metrics["loss"], state.step
        if self.dpo:
            self.preference_metrics = {
                "preference_accuracy": metrics["preferenceAccuracy"],
                "reward_margin": metrics["rewardMargin"],
            }
        if _early_stopping(self.training, state, metrics["loss"]) and self.stop_reason is None:
            self.stop_reason = "early stopping"
        if self.evaluator:
            self.evaluator.observe(state.step, metrics, last=self.stop_reason is not None)
        if self.trial and self.stop_reason is None and self.pending_rungs and state.step >= self.pending_rungs[0]:
            self._await_tune_verdict()
        return metrics

    def _await_tune_verdict(self) -> None:
        """At an ASHA rung, after the result went to Tune: wait for Tune's verdict on it (rank 0 asks, every
        rank learns it); a stop ends the loop here, without a checkpoint or an export (tune_verdicts)."""
        import torch
        import torch.distributed as dist

        from kubetune_trainer.tune_verdicts import await_verdict

        assert self.trial is not None
        step = self.state.step
        self.pending_rungs = [m for m in self.pending_rungs if m > step]
        stop = await_verdict(self.trial["board"], self.trial["id"], step) if self.rank == 0 else False
        flag = torch.tensor([1.0 if stop else 0.0], device=self.device)
        dist.broadcast(flag, src=0)
        if flag.item() > 0:
            self.tuner_stopped = True
            self.stop_reason = "stopped by the tuner"

    def report_steps(self, steps: list[StepResult], eval_metrics: dict[str, float]) -> None:
        """Synced steps: their token counts into the state; rank 0 writes a metrics line for each and one
        progress status (both sent by the reporter's thread). An evaluation belongs to the last step."""
        state, total_steps = self.state, self.total_steps
        seconds = self.train_seconds - sum(s.seconds for s in steps)  # training time before the first of them
        for step in steps:
            state.tokens += step.tokens
            self.attempt_tokens += step.tokens
            seconds += step.seconds
            if self.reporter:
                record = {
                    "step": step.step,
                    "epoch": step.epoch,
                    "loss": step.loss,
                    "lr": step.lr,
                    "tokens": state.tokens,
                    "stepTokens": step.tokens,
                    "stepSeconds": round(step.seconds, 4),
                    # CPU time of rank 0's process: well below stepSeconds when the machine is contended
                    "stepCpuSeconds": round(step.cpu_seconds, 4),
                    "tokensPerSecond": round(self.attempt_tokens / seconds, 1) if seconds else 0.0,
                }
                if eval_metrics and step is steps[-1]:
                    record.update({f"eval{k[0].upper()}{k[1:]}": v for k, v in eval_metrics.items()})
                self.reporter.metric(record)
            if step.step % self.training.eval_interval_steps == 0:
                log.info(
                    "step %d/%d loss %.4f%s lr %.2e",
                    step.step,
                    total_steps,
                    step.loss,
                    f" evalLoss {eval_metrics['loss']:.4f}" if eval_metrics and step is steps[-1] else "",
                    step.lr,
                )
        last = steps[-1]
        tps = self.attempt_tokens / self.train_seconds if self.train_seconds else 0.0
        if self.reporter:
            eta = (total_steps - state.step) * self.train_seconds / max(1, state.step - self.attempt_start_step)
            self.reporter.progress(
                step=state.step,
                total_steps=total_steps,
                epoch=last.epoch,
                loss=round(last.loss or 0.0, 6),
                eval_loss=state.last_eval_loss,
                **self.preference_metrics,
                tokens_per_second=round(tps, 1),
                eta_seconds=int(eta),
                percent=min(100, int(100 * state.step / total_steps)),
            )

    # ---------------------------------------------------------------- checkpoint

    def checkpoint(self) -> str:
        """Save the current step: every rank writes its files locally and its uploader sends them to S3 in the
        background (after the previous checkpoint's upload); rank 0's uploader marks it complete, then
        `_checkpoint_complete` applies the retention and reports it."""
        assert self.staging is not None
        t0 = time.monotonic()
        with self._timed("checkpoint", self.phase_seconds):
            uri = ckpt.save(
                self.engine,
                self.cfg,
                self.state,
                rank=self.rank,
                uploads=self.uploads,
                staging=self.staging,
                exclude_frozen=self.lora,
            )
            self.last_checkpoint_step = self.state.step
        self.checkpoint_seconds[self.state.step] = round(time.monotonic() - t0, 3)
        return uri

    def _checkpoint_complete(self, uri: str, marker: dict[str, Any]) -> None:
        """Rank 0's uploader thread, once `uri` is complete: retention (only now: a checkpoint is never
        deleted before its successor is complete) and the reports (the reporter is thread-safe)."""
        refs = ckpt.apply_retention(self.client, self.cfg, self.training.checkpoint.keep)
        reporter = self.reporter  # read once: the training thread sets it to None when it closes it
        if reporter:
            reporter.checkpoints(refs)
            step = marker["step"]
            reporter.metric(
                {
                    "event": "checkpoint",
                    "step": step,
                    "uri": uri,
                    "seconds": self.checkpoint_seconds.get(step),  # the training thread's part (local write)
                    "uploadSeconds": marker["uploadSeconds"],
                }
            )

    # ---------------------------------------------------------------- export

    def save_and_export(self) -> None:
        """After the last step: a final checkpoint if the last step has none (a resumed run that had already
        finished), a final evaluation, the exported model, and the base-vs-fine-tuned evaluation report."""
        from kubetune_trainer.export import export

        state, timed = self.state, self._timed
        if self.last_checkpoint_step != state.step:
            assert self.staging is not None
            self.checkpoint()
        final_eval = {}
        if self.eval_data is not None and state.last_eval_step != state.step:
            with timed("eval", self.phase_seconds):
                final_eval = self.evaluate()
            state.last_eval_loss, state.last_eval_step = final_eval["loss"], state.step
        assert self.staging is not None
        with timed("export", self.phase_seconds):
            self.artifact = export(
                self.engine,
                self.cfg,
                self.tokenizer,
                rank=self.rank,
                client=self.client,
                staging=self.staging,
                base_dir=self.base_dir,
                precision=self.precision,
            )
        with timed("checkpoint", self.phase_seconds):
            self.uploads.drain()  # the final checkpoint's upload ran during the evaluation and the export
        from kubetune_trainer.memory import all_ranks_peak_mb

        self.peak_memory_mb = all_ranks_peak_mb(self.device)  # training and export done: the run's peaks
        if self.evaluator and final_eval:
            self.evaluator.observe(state.step, final_eval, last=True)
        if self.evaluator:
            with timed("evaluationReport", self.phase_seconds):  # base vs fine-tuned report, sample answers
                if self.lora:  # the base model's figures and samples, adapters off (or from the cache)
                    self.evaluator.base(self.engine, state.step)
                self.evaluation = self.evaluator.finish(self.engine, state.step, self.artifact)

    def finish(self) -> dict[str, Any] | None:
        """Rank 0: the run's summary, reported as the final status and metrics line; other ranks: None."""
        if self.reporter is None:
            return None
        state = self.state
        summary = {
            "step": state.step,
            "totalSteps": self.total_steps,
            "stopReason": self.stop_reason,
            "evalLoss": state.last_eval_loss,
            "tokensPerSecond": round(self.attempt_tokens / self.train_seconds, 1) if self.train_seconds else None,
            "model": self.artifact.wire() if self.artifact else None,
        }
        if self.artifact:
            self.reporter.model(self.artifact)
        if self.evaluation:
            self.reporter.evaluation(self.evaluation)
            summary["evaluation"] = self.evaluation.wire()
        if self.tuner_stopped:  # the tuning driver reports the trial as early-stopped; it has no model
            self.reporter.metric({"event": "stoppedByTuner", **summary})
            self.reporter.close()
            self.reporter = None
            return summary
        self.reporter.progress(
            step=state.step,
            total_steps=self.total_steps,
            eval_loss=state.last_eval_loss,
            percent=100,
            eta_seconds=0,
            **self.preference_metrics,
        )
        # Where the wall time after setup went besides the training steps (the benchmark prints their shares).
        phases = {"train": round(self.train_seconds, 2), **self.phase_seconds}
        self.reporter.metric(
            {"event": "finished", **summary, "phaseSeconds": phases, "peakMemoryMB": self.peak_memory_mb}
        )
        self.reporter.close()
        self.reporter = None
        log.info("done in %.1fs: %s", time.monotonic() - self.t_start, json.dumps(summary))
        return summary

    # ---------------------------------------------------------------- cleanup

    def report_failure(self, exc: BaseException) -> None:
        """Rank 0: a failed attempt still leaves its history in S3: the steps so far, and why it stopped."""
        if self.uploads is not None:  # first: the checkpoint in flight may still complete and be reported
            self.uploads.close(timeout=UPLOAD_CLOSE_S)
        if self.reporter:
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            self.reporter.metric(
                {"event": "failed", "step": self.state.step, "error": f"{type(exc).__name__}: {first_line}"}
            )
            self.reporter.close(timeout=15)
            self.reporter = None

    def cleanup(self) -> None:
        """Always, success or failure: the trace file closed, the reporter flushed, staging files removed."""
        if self.trace:
            self.trace.close()
            self.trace = None
        if self.reporter:  # only when neither finish() nor report_failure() ran to the end
            self.reporter.close(timeout=15)
            self.reporter = None
        if self.uploads is not None:  # after a failure: the checkpoint in flight may still complete
            self.uploads.close(timeout=UPLOAD_CLOSE_S)
        if self.staging is not None:
            shutil.rmtree(self.staging, ignore_errors=True)


# ------------------------------------------------------------------------------------------- helpers


def _worker_logging(rank: int) -> None:
    """Timestamped, rank-tagged lines for this package (Ray has already configured the root logger)."""
    import sys

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter(f"%(asctime)s rank{rank} %(name)s: %(message)s"))
    log.handlers[:] = [handler]
    log.setLevel(logging.INFO)
    log.propagate = False


def _import_deepspeed(use_gpu: bool) -> Any:
    """DeepSpeed, set up for this machine before its first import.

    DS_ACCELERATOR picks DeepSpeed's device backend at import. On CPU, `init_distributed` would first
    compile a shared-memory C++ extension (minutes, needs a compiler) that gloo does not need: skipped.
    """
    os.environ.setdefault("DS_ACCELERATOR", "cuda" if use_gpu else "cpu")
    if not use_gpu:
        ds_comm_torch: Any = importlib.import_module("deepspeed.comm.torch")
        ds_comm_torch.build_shm_op = lambda: None
    import deepspeed

    return deepspeed


def _seed_all(seed: int) -> None:
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def _lr_schedule(optimizer: Any, training: Any, total_steps: int) -> Any:
    """Linear warmup over warmupRatio of the steps, then cosine, linear decay or constant (transformers')."""
    from transformers import get_scheduler

    name = {"cosine": "cosine", "linear": "linear", "constant": "constant_with_warmup"}[training.scheduler]
    warmup = math.ceil(training.warmup_ratio * total_steps)
    return get_scheduler(name, optimizer, num_warmup_steps=warmup, num_training_steps=total_steps)


def _to_tensors(data: dict[str, Any], rows: Any, device: Any, classification: bool) -> dict[str, Any]:
    """The model inputs of `rows`.

    Causal LM rows are packed: several examples share a row, each with positions counting from 0. Passing
    position_ids and no attention_mask makes transformers build a block-diagonal causal mask from them, so
    an example never attends to the one packed before it (padding at the end is position 0 again: a
    segment of its own, and its labels are -100).
    """
    import torch

    def tensor(name: str) -> Any:
        return torch.from_numpy(data[name][rows]).long().to(device, non_blocking=True)

    if classification:
        return {"input_ids": tensor("input_ids"), "attention_mask": tensor("attention_mask"), "labels": tensor("label")}
    return {"input_ids": tensor("input_ids"), "position_ids": tensor("position_ids"), "labels": tensor("labels")}


def _early_stopping(training: Any, state: TrainState, eval_loss: float) -> bool:
    """Update the early stopping state with a new evaluation; True when patience has run out."""
    rule = training.early_stopping
    if rule is None:
        return False
    if state.best_eval_loss is None or eval_loss < state.best_eval_loss - rule.min_delta:
        state.best_eval_loss, state.evals_without_improvement = eval_loss, 0
        return False
    state.evals_without_improvement += 1
    return cast(bool, state.evals_without_improvement >= rule.patience)


def _evaluate(
    engine: Any,
    data: dict[str, Any] | None,
    *,
    total: int,
    world: int,
    batch: int,
    device: Any,
    max_batches: int | None,
    classification: bool,
) -> dict[str, float]:
    """Loss (token-weighted), perplexity, and accuracy for classification, over the validation rows.

    Each rank takes the rows of its own held-out shard (`total` over all of them); every rank runs the same
    number of forward passes (ZeRO-3 gathers weights collectively inside each one), padding its last batches
    with a zero-weight row when it has fewer rows than the others.
    """
    import numpy as np
    import torch
    import torch.distributed as dist

    from kubetune_trainer.preference import eval_batches

    assert data is not None
    # On the device: NCCL reduces only GPU tensors. loss x weight, weight, correct, rows.
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for rows in eval_batches(len(data["input_ids"]), total, world=world, batch=batch, max_batches=max_batches):
            real = len(rows) > 0
            inputs = _to_tensors(data, rows if real else np.arange(1), device, classification)
            out = engine(**inputs)
            if not real:
                continue
            if classification:
                weight = float(len(rows))
                sums[2] += float((out.logits.argmax(-1) == inputs["labels"]).sum())
            else:
                weight = float((inputs["labels"][:, 1:] != -100).sum())  # the targets after the shift
            sums[3] += len(rows)
            if weight:
                sums[0] += out.loss.item() * weight
                sums[1] += weight
    engine.train()
    dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item() if sums[1] else float("nan")
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if classification:
        metrics["accuracy"] = (sums[2] / sums[3]).item() if sums[3] else float("nan")
    return metrics
