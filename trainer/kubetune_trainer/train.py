"""The training run: a Ray Train TorchTrainer whose workers train with DeepSpeed.

`fit` runs on the driver and launches `train_loop` on every worker. `train_loop` reads top to bottom:

    setup     process group, seeds, S3, base model (node cache), this rank's data shard, DeepSpeed engine,
              resume from the newest complete checkpoint, the reporter (rank 0)
    train     one optimizer step (gradient_accumulation_steps micro-batches) at a time; evaluate every
              evalIntervalSteps; checkpoint every checkpoint.intervalSteps; stop at the planned steps or early
    save      a final checkpoint, a final evaluation, the exported model
    cleanup   reporter flushed, staging files removed

Data order is a pure function of (epoch, seed) (`batch_indices`), so a resumed run that knows its epoch and
micro-batch position consumes exactly the batches the uninterrupted run would have, and no record twice.
Every rank holds an equal-sized shard, so all ranks run the same number of steps (ZeRO needs that: each
step ends in a collective).
"""

from __future__ import annotations

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
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune.api import TrainerConfig

from kubetune_trainer import checkpoint as ckpt
from kubetune_trainer.checkpoint import TrainState
from kubetune_trainer.data import DataError, PreparedData, batch_indices, load_shard, s3_client
from kubetune_trainer.deepspeed_config import deepspeed_config, offload_applies, resolve_precision

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
    kubeconfig: str | None = None  # the driver's KUBECONFIG, for status reports; None: in-cluster account


class InjectedFailure(RuntimeError):
    """Raised on purpose (KUBETUNE_FAIL_AFTER_STEP) to test resuming."""


# ------------------------------------------------------------------------------------------- driver


def fit(cfg: TrainerConfig, prepared: PreparedData, options: RunOptions,
        trial: dict[str, Any] | None = None) -> dict[str, Any]:
    """Run the training on the Ray cluster; returns rank 0's summary. Raises ray's TrainingFailedError.

    `trial` ({"id", "params", "jobRunUri"}) when this run is a Ray Tune trial (kubetune_trainer.tune)."""
    from ray.train import RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    resources = cfg.spec.resources
    use_gpu = resources.gpus_per_worker > 0
    run_config = RunConfig(name=f"{cfg.job.namespace}-{cfg.job.name}", storage_path=options.ray_storage or None)
    if trial is not None:  # a tuning trial: its own run name, its evaluations forwarded to Tune
        from kubetune_trainer.tune import trial_run_config

        run_config = trial_run_config(cfg, options, trial)
    trainer = TorchTrainer(
        train_loop,
        train_loop_config={
            "config": cfg.wire(),
            "prepared": dataclasses.asdict(prepared),
            "options": dataclasses.asdict(options),
            "trial": trial,
        },
        scaling_config=ScalingConfig(
            num_workers=resources.workers,
            use_gpu=use_gpu,
            resources_per_worker=worker_resources(cfg, options.local),
        ),
        # NCCL between GPUs; gloo on CPU (DeepSpeed reuses this process group).
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        run_config=run_config,
    )
    result = trainer.fit()
    return result.return_value or {}


def worker_resources(cfg: TrainerConfig, local: bool) -> dict[str, float]:
    """Ray resources of one training worker.

    On KubeRay each worker pod advertises its CPU limit (rounded down) and its GPUs; asking for all of them
    puts exactly one worker on each pod, and Ray then sets OMP_NUM_THREADS to that many CPUs. Locally the
    machine may have 2 cores for 2 workers and the driver: half a CPU each leaves room for the rest (with a
    whole CPU each, Ray's other tasks starve and the run hangs).
    """
    res = cfg.spec.resources
    cpus = 0.5 if local else float(max(1, math.floor(_cpu_quantity(res.cpu_per_worker))))
    out = {"CPU": cpus}
    if res.gpus_per_worker:
        out["GPU"] = float(res.gpus_per_worker)
    return out


def _cpu_quantity(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


# ------------------------------------------------------------------------------------------- worker


def train_loop(loop_config: dict[str, Any]) -> dict[str, Any] | None:
    """One Ray Train worker's whole run (see the module docstring)."""
    import ray.train
    import ray.train.torch

    cfg = TrainerConfig.model_validate(loop_config["config"])
    prepared = PreparedData(**loop_config["prepared"])
    opts = RunOptions(**loop_config["options"])
    trial = loop_config.get("trial")  # set when this run is a tuning trial (kubetune_trainer.tune)
    spec, training = cfg.spec, cfg.spec.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    _worker_logging(rank)
    t_start = time.monotonic()

    # ---------------------------------------------------------------- setup
    use_gpu = spec.resources.gpus_per_worker > 0
    deepspeed = _import_deepspeed(use_gpu)
    import numpy as np
    import torch
    import torch.distributed as dist

    deepspeed.init_distributed(dist_backend="nccl" if use_gpu else "gloo")  # reuses Ray's process group
    # Ray gives each worker its own GPU(s) through CUDA_VISIBLE_DEVICES: get_device() knows which index.
    device = ray.train.torch.get_device() if use_gpu else torch.device("cpu")
    if use_gpu:
        torch.cuda.set_device(device)
    precision = resolve_precision(training.precision, use_gpu)
    if training.deepspeed.offload == "cpu" and not offload_applies(training, use_gpu):
        log.info("deepspeed.offload=cpu has no effect on a CPU-only run; everything is in host memory already")
    staging = Path(tempfile.mkdtemp(prefix=f"kubetune-{cfg.job.name}-rank{rank}-", dir=opts.staging_dir or None))

    _seed_all(training.seed)  # identical on every rank: the new weights (LoRA, heads) must start equal
    from kubetune_trainer import model as model_lib
    from kubetune_trainer.export import export
    from kubetune_trainer.status_reporter import Reporter

    client = s3_client(spec.dataset.endpoint, spec.dataset.region)
    base_dir = model_lib.fetch_base(spec, client, Path(opts.model_cache))
    tokenizer = model_lib.load_tokenizer(spec, base_dir)
    model = model_lib.load_model(spec, base_dir, precision=precision, pad_token_id=tokenizer.pad_token_id)
    classification = spec.model.task == "sequence-classification"
    lora = training.method == "lora"

    if len(prepared.train_shards) != world:
        raise DataError(f"the data was prepared in {len(prepared.train_shards)} shards for {world} workers")
    train_data = load_shard([prepared.train_shards[rank]], client)  # this rank's shard only
    eval_data = load_shard(prepared.validation_shards, client) if prepared.validation_shards else None
    num_rows = len(train_data["input_ids"])
    batch, accum = training.per_device_batch_size, training.gradient_accumulation_steps
    # An incomplete accumulation group at the end of an epoch is dropped, so that every optimizer step
    # starts on an epoch-aligned group and a checkpoint position is always (epoch, micro_batch).
    micro_per_epoch = len(batch_indices(num_rows, batch, 0, training.seed)) // accum * accum
    steps_per_epoch = micro_per_epoch // accum
    if steps_per_epoch == 0:
        raise DataError(
            f"each worker has {num_rows} training sequences, fewer than one optimizer step needs "
            f"({batch} x {accum}); add data or lower perDeviceBatchSize / gradientAccumulationSteps"
        )
    total_steps = training.max_steps or max(1, math.ceil(training.epochs * steps_per_epoch))

    ds_config = deepspeed_config(training, world_size=world, use_gpu=use_gpu)
    engine, _, _, scheduler = deepspeed.initialize(
        model=model,
        model_parameters=[p for p in model.parameters() if p.requires_grad],
        config=ds_config,
        lr_scheduler=lambda optimizer: _lr_schedule(optimizer, training, total_steps),
    )

    state = TrainState(world_size=world, data_fingerprint=prepared.fingerprint)
    latest = [ckpt.find_latest(client, cfg) if rank == 0 else None]
    dist.broadcast_object_list(latest, src=0)  # every rank resumes from the same checkpoint
    if latest[0]:
        state = ckpt.load(engine, latest[0], rank=rank, world_size=world, client=client, staging=staging,
                          exclude_frozen=lora)
        if state.data_fingerprint != prepared.fingerprint:
            log.warning("resuming %s, whose data fingerprint differs from this run's: the data or its "
                        "preprocessing changed, so the data position is only approximate", latest[0])
        log.info("resumed from %s at step %d (epoch %d, micro-batch %d)", latest[0], state.step, state.epoch,
                 state.micro_batch)
    else:
        _seed_all(training.seed + 1 + rank)  # dropout differs between ranks (different data, different masks)

    reporter = None
    if rank == 0:
        reporter = Reporter(cfg, client, resumed_step=state.step if latest[0] else None, kubeconfig=opts.kubeconfig)
    if reporter:
        reporter.data(prepared.stats)
        reporter.metric({"event": "start", "step": state.step, "totalSteps": total_steps, "worldSize": world,
                         "stepsPerEpoch": steps_per_epoch, "resumedFrom": latest[0]})
    trace = open(Path(opts.trace_dir) / f"rank-{rank}.jsonl", "a") if opts.trace_dir else None

    def evaluate() -> dict[str, float]:
        return _evaluate(engine, eval_data, rank=rank, world=world, batch=batch, device=device,
                         max_batches=training.max_eval_batches, classification=classification)

    # The base model's figures on the held-out data, before any step (kubetune_trainer.evaluate).
    evaluator = None
    if eval_data is not None:
        from kubetune_trainer.evaluate import Evaluator

        evaluator = Evaluator(cfg, client, tokenizer, eval_data, rank=rank, device=device, lora=lora,
                              zero_stage=training.deepspeed.zero_stage, classification=classification,
                              data_fingerprint=prepared.fingerprint, evaluate=evaluate, trial=trial)
        evaluator.base(engine, state.step)
    if reporter and trial:
        reporter.for_trial(trial["id"])

    try:
        # ---------------------------------------------------------------- train
        log.info("training %d steps (%d per epoch, %d sequences per worker, %d workers, ZeRO-%d, %s, %s); "
                 "setup took %.1fs", total_steps, steps_per_epoch, num_rows, world, training.deepspeed.zero_stage,
                 training.method, precision, time.monotonic() - t_start)
        # Throughput and ETA count only training steps of this attempt (not evaluation, checkpoints or setup).
        train_seconds, attempt_tokens, attempt_start_step = 0.0, 0, state.step
        last_checkpoint_step = state.step if latest[0] else None
        stop_reason = state.stop_reason or ("max steps" if state.step >= total_steps else None)
        epoch_batches: list[Any] = []
        epoch_of_batches = -1
        while stop_reason is None:
            if epoch_of_batches != state.epoch:
                epoch_batches = batch_indices(num_rows, batch, state.epoch, training.seed)[:micro_per_epoch]
                epoch_of_batches = state.epoch
            t0, cpu0 = time.perf_counter(), time.process_time()
            loss_sum = torch.zeros((), dtype=torch.float64, device=device)
            tokens = 0
            for _ in range(accum):
                rows = epoch_batches[state.micro_batch]
                inputs = _to_tensors(train_data, rows, device, classification)
                loss = engine(**inputs).loss
                engine.backward(loss)
                engine.step()  # applies the update (and steps the LR schedule) on the accumulation boundary
                loss_sum += loss.detach().double()  # on the device: no host sync per micro-batch
                tokens += int(train_data["attention_mask"][rows].sum())  # real tokens, counted on the host
                if trace:
                    trace.write(json.dumps({"step": state.step + 1, "epoch": state.epoch,
                                            "micro": state.micro_batch, "rows": [int(r) for r in rows]}) + "\n")
                    trace.flush()
                state.micro_batch += 1
            state.step += 1
            if state.micro_batch >= micro_per_epoch:
                state.epoch, state.micro_batch = state.epoch + 1, 0
            totals = torch.stack([loss_sum / accum, torch.tensor(float(tokens), dtype=torch.float64, device=device)])
            dist.all_reduce(totals)
            mean_loss, step_tokens = totals.tolist()
            step_loss, step_tokens = mean_loss / world, int(step_tokens)
            state.samples += batch * accum * world
            state.tokens += step_tokens
            step_seconds, step_cpu_seconds = time.perf_counter() - t0, time.process_time() - cpu0
            train_seconds += step_seconds
            attempt_tokens += step_tokens
            lr = scheduler.get_last_lr()[0]
            fraction_epoch = state.epoch + state.micro_batch / micro_per_epoch

            if state.step >= total_steps:
                stop_reason = "max steps" if training.max_steps else "epochs"

            eval_metrics: dict[str, float] = {}
            if eval_data is not None and (state.step % training.eval_interval_steps == 0 or stop_reason):
                eval_metrics = evaluate()
                state.last_eval_loss, state.last_eval_step = eval_metrics["loss"], state.step
                stop_early = _early_stopping(training, state, eval_metrics["loss"])
                if stop_early and stop_reason is None:
                    stop_reason = "early stopping"
                if evaluator:  # a tuning trial reports it to Tune (ASHA decides on it)
                    evaluator.observe(state.step, eval_metrics, last=stop_reason is not None)
            state.stop_reason = stop_reason  # saved with the checkpoint: a finished run is not continued

            tps = attempt_tokens / train_seconds if train_seconds else 0.0
            if reporter:
                eta = (total_steps - state.step) * train_seconds / max(1, state.step - attempt_start_step)
                record = {"step": state.step, "epoch": round(fraction_epoch, 4), "loss": step_loss, "lr": lr,
                          "tokens": state.tokens, "stepTokens": step_tokens, "stepSeconds": round(step_seconds, 4),
                          # CPU time of rank 0's process: well below stepSeconds when the machine is contended
                          "stepCpuSeconds": round(step_cpu_seconds, 4), "tokensPerSecond": round(tps, 1)}
                if eval_metrics:
                    record.update({f"eval{k[0].upper()}{k[1:]}": v for k, v in eval_metrics.items()})
                reporter.metric(record)
                reporter.progress(step=state.step, total_steps=total_steps, epoch=round(fraction_epoch, 4),
                                  loss=round(step_loss, 6), eval_loss=state.last_eval_loss,
                                  tokens_per_second=round(tps, 1), eta_seconds=int(eta),
                                  percent=min(100, int(100 * state.step / total_steps)))
            if state.step % training.eval_interval_steps == 0:
                log.info("step %d/%d loss %.4f%s lr %.2e %.0f tokens/s", state.step, total_steps, step_loss,
                         f" evalLoss {eval_metrics['loss']:.4f}" if eval_metrics else "", lr, tps)

            if state.step % training.checkpoint.interval_steps == 0 or stop_reason:
                uri = ckpt.save(engine, cfg, state, rank=rank, client=client, staging=staging, exclude_frozen=lora)
                last_checkpoint_step = state.step
                if reporter:
                    refs = ckpt.apply_retention(client, cfg, training.checkpoint.keep)
                    reporter.checkpoints(refs)
                    reporter.metric({"event": "checkpoint", "step": state.step, "uri": uri})
            if opts.fail_after_step is not None and state.step == opts.fail_after_step:
                raise InjectedFailure(f"injected failure after step {state.step} (KUBETUNE_FAIL_AFTER_STEP)")

        # ---------------------------------------------------------------- save
        if last_checkpoint_step != state.step:  # a resumed run that had already finished
            ckpt.save(engine, cfg, state, rank=rank, client=client, staging=staging, exclude_frozen=lora)
        final_eval = evaluate() if eval_data is not None and state.last_eval_step != state.step else {}
        if final_eval:
            state.last_eval_loss, state.last_eval_step = final_eval["loss"], state.step
        artifact = export(engine, cfg, tokenizer, rank=rank, client=client, staging=staging, base_dir=base_dir,
                          precision=precision)
        if evaluator and final_eval:
            evaluator.observe(state.step, final_eval, last=True)
        evaluation = evaluator.finish(engine, state.step, artifact) if evaluator else None  # report, samples
    except BaseException as exc:
        if reporter:  # a failed attempt still leaves its history in S3: the steps so far, and why it stopped
            first_line = (str(exc).strip().splitlines() or [""])[0][:300]
            reporter.metric({"event": "failed", "step": state.step,
                             "error": f"{type(exc).__name__}: {first_line}"})
            reporter.close(timeout=15)
        raise
    finally:
        if trace:
            trace.close()

    # ---------------------------------------------------------------- cleanup
    shutil.rmtree(staging, ignore_errors=True)
    if rank != 0:
        return None
    summary = {
        "step": state.step, "totalSteps": total_steps, "stopReason": stop_reason, "evalLoss": state.last_eval_loss,
        "tokensPerSecond": round(attempt_tokens / train_seconds, 1) if train_seconds else None,
        "model": artifact.wire() if artifact else None,
    }
    assert reporter is not None
    if artifact:
        reporter.model(artifact)
    if evaluation:
        reporter.evaluation(evaluation)
        summary["evaluation"] = evaluation.wire()
    reporter.progress(step=state.step, total_steps=total_steps, eval_loss=state.last_eval_loss, percent=100,
                      eta_seconds=0)
    reporter.metric({"event": "finished", **summary})
    reporter.close()
    log.info("done in %.1fs: %s", time.monotonic() - t_start, json.dumps(summary))
    return summary


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
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
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
        return {"input_ids": tensor("input_ids"), "attention_mask": tensor("attention_mask"),
                "labels": tensor("label")}
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
    return state.evals_without_improvement >= rule.patience


def _evaluate(engine: Any, data: dict[str, Any] | None, *, rank: int, world: int, batch: int, device: Any,
              max_batches: int | None, classification: bool) -> dict[str, float]:
    """Loss (token-weighted), perplexity, and accuracy for classification, over the validation rows.

    Rank r takes rows r, r+world, ...; every rank runs the same number of forward passes (ZeRO-3 gathers
    weights collectively inside each one), padding its last batches with a zero-weight row when it has
    fewer rows than the others.
    """
    import numpy as np
    import torch
    import torch.distributed as dist

    assert data is not None
    n = len(data["input_ids"])
    mine = np.arange(rank, n, world)
    num_batches = math.ceil(math.ceil(n / world) / batch)
    if max_batches:
        num_batches = min(num_batches, max_batches)
    # On the device: NCCL reduces only GPU tensors. loss x weight, weight, correct.
    sums = torch.zeros(3, dtype=torch.float64, device=device)
    engine.eval()
    with torch.no_grad():
        for b in range(num_batches):
            rows = mine[b * batch:(b + 1) * batch]
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
            if weight:
                sums[0] += out.loss.item() * weight
                sums[1] += weight
    engine.train()
    dist.all_reduce(sums)
    loss = (sums[0] / sums[1]).item() if sums[1] else float("nan")
    metrics = {"loss": loss, "perplexity": math.exp(min(loss, 50.0))}
    if classification:
        total = min(n, num_batches * batch * world)
        metrics["accuracy"] = sums[2].item() / total if total else float("nan")
    return metrics
