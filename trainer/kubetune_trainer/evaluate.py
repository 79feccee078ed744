"""Evaluation: the base model and the fine-tune on the same held-out data, a few sample outputs, the report.

Where it runs: on the training workers, with the engine they already hold (so a big model is evaluated on the
GPUs it trains on, never on a GPU-less head). All ranks take part in every evaluation pass (ZeRO-3 gathers
weights collectively inside each forward); rank 0 alone writes files and reports.

- The base figures are measured once, before the first optimizer step: the engine then holds exactly the base
  model (LoRA's B matrices start at zero; a full fine-tune has not changed a weight yet), on exactly the
  held-out rows every later evaluation uses. They are cached in S3 (`base.json`, keyed by base model, data
  fingerprint and evaluation settings), so a resumed run and every tuning trial reuse them. A run resumed
  without the cache measures LoRA's base with the adapters switched off; a resumed full fine-tune cannot.
- The fine-tuned figures are the final evaluation, after the last step.
- Samples: greedy, short generations on the first few held-out examples (the prompt part of
  instruction/chat records; the first tokens of completion records), from the base before training and from
  the fine-tune after; for classification the base and fine-tuned predicted label of a few held-out texts.

`<run>/eval/report.json` holds it all (per tuning trial under `<run>/trials/<id>/eval/`);
`status.evaluation` summarises it for the objective metric: {metric, base, fineTuned, improvement, reportUri}
with improvement = base - fineTuned for losses (positive = better) and fineTuned - base for accuracies. A DPO
job is judged on held-out preference accuracy (kubetune_trainer.preference), so spec.deploy.minImprovement gates
on it.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable
from typing import Any

from kubetune.api import EvaluationSummary, FineTuneJobSpec, TrainerConfig
from kubetune.clock import now_rfc3339
from kubetune_trainer import storage

log = logging.getLogger("kubetune_trainer")

REPORT_VERSION = 1
NUM_SAMPLES = 3  # held-out examples generated from / classified
PROMPT_TOKENS = 48  # at most this many prompt tokens (the end is kept: the assistant header must stay)
COMPLETION_PROMPT_TOKENS = 16  # completion records: the prompt is the first this-many tokens (at most half)
NEW_TOKENS = 16  # greedy tokens generated per sample
# Wire metric name -> key of the trainer's evaluation dict (train._evaluate).
METRIC_KEYS = {
    "evalLoss": "loss",
    "perplexity": "perplexity",
    "accuracy": "accuracy",
    "preferenceAccuracy": "preferenceAccuracy",
    "rewardMargin": "rewardMargin",
}
HIGHER_IS_BETTER = {"accuracy", "preferenceAccuracy", "rewardMargin"}


# ------------------------------------------------------------------------------------------ pure parts


def objective_metric(spec: FineTuneJobSpec) -> str:
    """The metric a job is judged on: the tuning objective, else accuracy for classification, held-out
    preference accuracy for DPO, else evalLoss."""
    if spec.tuning is not None:
        return spec.tuning.objective.metric
    if spec.training.objective == "dpo":
        return "preferenceAccuracy"
    return "accuracy" if spec.model.task == "sequence-classification" else "evalLoss"


def higher_is_better(metric: str) -> bool:
    return metric in HIGHER_IS_BETTER


def improvement(metric: str, base: float | None, fine_tuned: float | None) -> float | None:
    """How much better the fine-tune is; positive is better whatever the metric's direction."""
    if base is None or fine_tuned is None or not (math.isfinite(base) and math.isfinite(fine_tuned)):
        return None
    return fine_tuned - base if higher_is_better(metric) else base - fine_tuned


def wire_metrics(metrics: dict[str, float]) -> dict[str, float]:
    """The trainer's evaluation dict (loss, perplexity[, accuracy]; DPO: loss, preferenceAccuracy,
    rewardMargin) under the API's metric names."""
    return {name: float(metrics[key]) for name, key in METRIC_KEYS.items() if key in metrics}


def summary(report: dict[str, Any], metric: str, report_uri: str) -> EvaluationSummary:
    """status.evaluation for a report."""
    base = (report.get("base") or {}).get(metric)
    fine = (report.get("fineTuned") or {}).get(metric)
    return EvaluationSummary(
        metric=metric,
        base=_finite(base),
        fine_tuned=_finite(fine),
        improvement=improvement(metric, base, fine),
        report_uri=report_uri,
    )


def _finite(x: Any) -> float | None:
    return float(x) if isinstance(x, (int, float)) and math.isfinite(x) else None


def held_out_examples(
    data: dict[str, Any], classification: bool, k: int = NUM_SAMPLES, completion: bool = False
) -> list[dict[str, Any]]:
    """The first `k` held-out examples as token lists: {"prompt", "reference"} for causal LM (prompt: what an
    instruction/chat record asks, i.e. the tokens before its first target, or for `completion` records the
    first tokens; reference: what follows), and {"ids", "label"} for classification. A pure function of the
    prepared rows, identical on every rank."""
    import numpy as np

    out: list[dict[str, Any]] = []
    n = len(data["input_ids"])
    for r in range(n):
        if len(out) >= k:
            break
        if classification:
            ids = data["input_ids"][r][data["attention_mask"][r] == 1]
            out.append({"ids": [int(t) for t in ids], "label": int(data["label"][r])})
            continue
        seg = data["segment_ids"][r]
        for s in [int(x) for x in np.unique(seg) if x > 0]:
            if len(out) >= k:
                break
            where = np.nonzero(seg == s)[0]
            ids, labels = data["input_ids"][r][where], data["labels"][r][where]
            targets = np.nonzero(labels != -100)[0]
            if len(targets) == 0:
                continue
            cut = int(targets[0])
            if completion or cut == 0:  # (nearly) every token is a target: prompt with the first few
                cut = min(COMPLETION_PROMPT_TOKENS, max(1, len(ids) // 2))
            if cut >= len(ids):
                continue
            out.append(
                {
                    "prompt": [int(t) for t in ids[:cut][-PROMPT_TOKENS:]],
                    "reference": [int(t) for t in ids[cut : cut + NEW_TOKENS]],
                }
            )
    return out


# ------------------------------------------------------------------------------------ on the workers


class Evaluator:
    """Base vs fine-tuned evaluation inside the training loop (`train.train_loop`); all ranks call every method.

    `evaluate` is the loop's own collective evaluation (loss, perplexity, accuracy); `trial` is set when the run
    is a Ray Tune trial ({"id", "params", "jobRunUri"}): then each intermediate evaluation is reported to Tune
    (ASHA decides on them) and the final one after the model is exported.
    """

    def __init__(
        self,
        cfg: TrainerConfig,
        client: Any,
        tokenizer: Any,
        data: dict[str, Any],
        *,
        total_rows: int,
        rank: int,
        device: Any,
        lora: bool,
        zero_stage: int,
        classification: bool,
        data_fingerprint: str,
        evaluate: Callable[[], dict[str, float]],
        trial: dict[str, Any] | None = None,
    ):
        self.cfg, self.client, self.tokenizer = cfg, client, tokenizer
        self.rank, self.device, self.lora, self.classification = rank, device, lora, classification
        self.zero3 = zero_stage == 3
        self.evaluate = evaluate
        self.trial = trial
        self.metric = objective_metric(cfg.spec)
        self.examples = self._examples(data, completion=cfg.spec.dataset.format == "completion")
        self.num_rows = total_rows
        # Tuning trials share the job's base figures: same base model, same held-out rows.
        base_dir = f"{trial['jobRunUri']}/eval" if trial else cfg.eval_uri
        self.base_uri = f"{base_dir}/base.json"
        self.report_uri = f"{cfg.eval_uri}/report.json"
        training = cfg.spec.training
        self.cache_key = {
            "model": cfg.spec.model.uri,
            "data": data_fingerprint,
            "task": cfg.spec.model.task,
            "maxEvalBatches": training.max_eval_batches,
            "seed": training.seed,
            "batch": training.per_device_batch_size,
        }
        self.base_figures: dict[str, float] | None = None
        self.base_samples: list[Any] = []
        self._last: tuple[int, dict[str, float]] | None = None

    def _examples(self, data: dict[str, Any], completion: bool) -> list[dict[str, Any]]:
        """The held-out examples the report shows: the first of rank 0's shard (the first held-out rows). Under
        ZeRO-3 every rank generates them together, so rank 0 hands them to the others (whose shards differ)."""
        import torch.distributed as dist

        mine = held_out_examples(data, self.classification, completion=completion) if self.rank == 0 else []
        if not self.zero3:
            return mine
        shared: list[list[dict[str, Any]]] = [mine]
        dist.broadcast_object_list(shared, src=0)
        return shared[0]

    # ---------------------------------------------------------------- base model

    def base(self, engine: Any, step: int) -> None:
        """Measure (or load) the base model's figures and samples; `step` is where training starts."""
        import torch.distributed as dist

        cached = [self._load_base() if self.rank == 0 else None]
        dist.broadcast_object_list(cached, src=0)
        if cached[0] is not None:
            self.base_figures, self.base_samples = cached[0]["metrics"], cached[0]["samples"]
            return
        if step > 0 and not self.lora:
            log.warning(
                "resumed at step %d without the base model's evaluation (%s): the report will have no base figures",
                step,
                self.base_uri,
            )
            return
        t0 = time.monotonic()
        # At step 0 the engine is the base model; later (resumed LoRA) the adapters are switched off.
        off = engine.module.disable_adapter() if step > 0 else contextlib.nullcontext()
        with off:
            self.base_figures = wire_metrics(self.evaluate())
            self.base_samples = self._samples(engine)
        if self.rank == 0:
            try:
                storage.put_json(
                    self.client,
                    self.base_uri,
                    {
                        "key": self.cache_key,
                        "metrics": self.base_figures,
                        "samples": self.base_samples,
                        "time": now_rfc3339(),
                    },
                )
            except Exception as exc:  # noqa: BLE001 - the cache is an optimisation
                log.warning("could not write %s (%s)", self.base_uri, type(exc).__name__)
        log.info("base model on the held-out data: %s (%.1fs)", _fmt(self.base_figures), time.monotonic() - t0)

    def _load_base(self) -> dict[str, Any] | None:
        try:
            raw = storage.get_bytes(self.client, self.base_uri)
        except Exception as exc:  # noqa: BLE001 - the cache is an optimisation: measure again
            log.warning("could not read %s (%s); measuring the base model again", self.base_uri, type(exc).__name__)
            return None
        if raw is None:
            return None
        import json

        try:
            cached = json.loads(raw)
        except ValueError:
            return None
        return cached if cached.get("key") == self.cache_key else None

    # ---------------------------------------------------------------- during training

    def observe(self, step: int, metrics: dict[str, float], last: bool) -> None:
        """An evaluation of the loop; in a Tune trial, reported to Tune unless it is the last one (that one is
        reported by `finish`, after the export, so a trial Tune stops there has its model already)."""
        self._last = (step, metrics)
        if self.trial is not None and not last:
            report_to_tune(step, wire_metrics(metrics), final=False)

    # ---------------------------------------------------------------- after training

    def finish(self, engine: Any, step: int, artifact: Any) -> EvaluationSummary | None:
        """The final figures, samples and report (rank 0 writes it and gets the summary; others get None)."""
        if self._last is not None and self._last[0] == step:
            final = self._last[1]
        else:
            final = self.evaluate()
        fine = wire_metrics(final)
        fine_samples = self._samples(engine)
        result = None
        if self.rank == 0:
            report = self._report(step, fine, fine_samples, artifact)
            storage.put_json(self.client, self.report_uri, report)
            result = summary(report, self.metric, self.report_uri)
            log.info(
                "evaluation: %s base %s -> fine-tuned %s (improvement %s); report %s",
                self.metric,
                _num(result.base),
                _num(result.fine_tuned),
                _num(result.improvement),
                self.report_uri,
            )
        if self.trial is not None:
            report_to_tune(step, fine, final=True)
        return result

    def _report(self, step: int, fine: dict[str, float], fine_samples: list[Any], artifact: Any) -> dict[str, Any]:
        spec = self.cfg.spec
        ds = spec.dataset
        base = self.base_figures or {}
        samples = []
        for i, ex in enumerate(self.examples):
            b = self.base_samples[i] if i < len(self.base_samples) else None
            f = fine_samples[i] if i < len(fine_samples) else None
            samples.append(self._sample_entry(ex, b, f))
        return {
            "version": REPORT_VERSION,
            "job": {"name": self.cfg.job.name, "namespace": self.cfg.job.namespace},
            "trial": {"id": self.trial["id"], "params": self.trial["params"]} if self.trial else None,
            "task": spec.model.task,
            "metric": self.metric,
            "baseModel": spec.model.uri,
            "heldOut": {
                "source": ds.validation or f"{ds.validation_split:g} of {', '.join(ds.train_uris())} (by record hash)",
                "sequences": self.num_rows,
                "maxEvalBatches": spec.training.max_eval_batches,
                "dataFingerprint": self.cache_key["data"],
            },
            "base": base or None,
            "fineTuned": {**fine, "step": step},
            "improvement": {k: improvement(k, base.get(k), v) for k, v in fine.items()} if base else None,
            "samples": samples,
            "model": artifact.wire() if artifact is not None else None,
            "createdAt": now_rfc3339(),
        }

    def _sample_entry(self, ex: dict[str, Any], base: Any, fine: Any) -> dict[str, Any]:
        tok = self.tokenizer
        if self.classification:
            names = self.cfg.spec.dataset.labels

            def name(i: Any) -> Any:
                return names[i] if names and isinstance(i, int) and 0 <= i < len(names) else i

            return {
                "text": tok.decode(ex["ids"], skip_special_tokens=True)[:500],
                "label": name(ex["label"]),
                "base": name(base),
                "fineTuned": name(fine),
            }
        return {
            "prompt": tok.decode(ex["prompt"], skip_special_tokens=False),
            "reference": tok.decode(ex["reference"], skip_special_tokens=True),
            "base": base,
            "fineTuned": fine,
        }

    # ---------------------------------------------------------------- samples

    def _samples(self, engine: Any) -> list[Any]:
        """Greedy continuations (or predicted labels) of the held-out examples. Under ZeRO-3 every rank runs
        the same forward passes (weights are gathered collectively); otherwise rank 0 alone does."""
        if not self.examples or (self.rank != 0 and not self.zero3):
            return []
        import torch

        module = engine.module
        was_training = module.training
        module.eval()
        out: list[Any] = []
        try:
            with torch.no_grad():
                for ex in self.examples:
                    if self.classification:
                        ids = torch.tensor([ex["ids"]], dtype=torch.long, device=self.device)
                        logits = module(input_ids=ids, attention_mask=torch.ones_like(ids)).logits
                        out.append(int(logits[0].argmax(-1)))
                        continue
                    ids = torch.tensor([ex["prompt"]], dtype=torch.long, device=self.device)
                    gen = module.generate(
                        input_ids=ids,
                        attention_mask=torch.ones_like(ids),
                        max_new_tokens=NEW_TOKENS,
                        do_sample=False,
                        use_cache=True,
                        synced_gpus=self.zero3,
                        pad_token_id=self.tokenizer.pad_token_id,
                        eos_token_id=self.tokenizer.eos_token_id,
                    )
                    out.append(self.tokenizer.decode(gen[0, ids.shape[1] :], skip_special_tokens=True))
        except Exception as exc:  # samples illustrate; they must never fail a finished training
            if self.zero3:
                raise  # the other ranks are inside the same collective generation
            log.warning("sample generation failed (%s: %s); the report has no samples", type(exc).__name__, exc)
            out = []
        finally:
            module.train(was_training)
        return out


def report_to_tune(step: int, metrics: dict[str, float], *, final: bool) -> None:
    """One result for Ray Tune (through ray.train.report on every worker and the trial's TuneReportCallback,
    which forwards rank 0's). `step` is ASHA's time attribute; the final result (the trained and exported
    model's) carries `trainedSteps` instead, so ASHA leaves it alone: a decision there could only kill a
    finished trial while it cleans up."""
    import ray.train

    when = {"trainedSteps": step} if final else {"step": step}
    ray.train.report({**when, **tune_safe(metrics), "final": 1 if final else 0})


def tune_safe(metrics: dict[str, float]) -> dict[str, float]:
    """A diverged trial's NaN loss would never be stopped (NaN compares false): report it as the worst value."""
    worst = {"accuracy": 0.0, "preferenceAccuracy": 0.0, "rewardMargin": -math.inf}
    return {k: (v if math.isfinite(v) else worst.get(k, math.inf)) for k, v in metrics.items()}


def _num(x: float | None) -> str:
    return "-" if x is None else f"{x:.4f}"


def _fmt(metrics: dict[str, float] | None) -> str:
    return ", ".join(f"{k} {v:.4f}" for k, v in (metrics or {}).items())
