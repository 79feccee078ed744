"""Direct Preference Optimization in the training loop: log-probabilities of a preference row's two sequences,
the reference model's, the loss, and the held-out preference metrics.

A prepared preference row holds prompt + chosen (segment 1) and prompt + rejected (segment 2), each with its own
positions (data/encode.py, data/packing.py); one forward pass scores both, the block-diagonal mask transformers
builds from position_ids keeping them apart.

The loss is the sigmoid DPO loss of Rafailov et al. 2023, "Direct Preference Optimization: Your Language Model is
Secretly a Reward Model" (arXiv:2305.18290, eq. 7):
    -log sigmoid(beta * ((log pi(y_w|x) - log ref(y_w|x)) - (log pi(y_l|x) - log ref(y_l|x))))
which is TRL's DPOTrainer loss_type "sigmoid". It is written here, not imported: trl 1.16 resolves beside the
pins, but its loss is a method of DPOTrainer, a transformers Trainer that owns data collation, the model wrapping
and the reference model, none of which fits a Ray Train + DeepSpeed loop; the formula itself is two lines.

The reference model is the base, with no second copy of the weights, run by the same engine (the same ZeRO stage
and sharding):
- LoRA: the policy with its adapters switched off (peft's disable_adapter), one extra no-grad forward pass per
  micro-batch.
- full fine-tuning: the weights are the base's only until the first update, so the reference log-probabilities of
  exactly the rows the planned steps will use (the data order is a pure function of seed and epoch) and of the
  held-out rows are computed then, before a checkpoint is restored. TRL offers the same (precompute_ref_log_probs);
  it costs one forward pass per used row instead of a frozen copy of the model on every GPU.

Held-out metrics: loss (the DPO loss), preferenceAccuracy (share of pairs whose chosen response the model finds
likelier than the rejected one: the base model's figure is meaningful too, so it can be compared and gated on),
rewardMargin (mean beta-scaled implicit reward of chosen minus rejected; 0 for the base).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any

import numpy as np

IGNORE = -100


def pair_logps(logits: Any, labels: Any, segment_ids: Any) -> Any:
    """[batch, 2] summed log-probabilities of the target tokens of segment 1 (chosen) and 2 (rejected)."""
    import torch
    import torch.nn.functional as F

    targets, seg = labels[:, 1:], segment_ids[:, 1:]
    mask = targets != IGNORE
    token = -F.cross_entropy(logits[:, :-1].float().transpose(1, 2), targets.clamp(min=0), reduction="none")
    token = token * mask
    return torch.stack([(token * (seg == 1)).sum(-1), (token * (seg == 2)).sum(-1)], -1)


def dpo_loss(policy: Any, reference: Any, beta: float) -> tuple[Any, Any]:
    """Per pair: the sigmoid DPO loss and the reward margin beta * (chosen log-ratio - rejected log-ratio)."""
    import torch.nn.functional as F

    margin = beta * ((policy[:, 0] - reference[:, 0]) - (policy[:, 1] - reference[:, 1]))
    return -F.logsigmoid(margin), margin


def _inputs(data: dict[str, Any], rows: Any, device: Any) -> dict[str, Any]:
    import torch

    def tensor(name: str) -> Any:
        return torch.from_numpy(data[name][rows]).long().to(device, non_blocking=True)

    return {
        "input_ids": tensor("input_ids"),
        "position_ids": tensor("position_ids"),
        "labels": tensor("labels"),
        "segment_ids": tensor("segment_ids"),
    }


def _scores(engine: Any, data: dict[str, Any], rows: Any, device: Any) -> Any:
    x = _inputs(data, rows, device)
    logits = engine(input_ids=x["input_ids"], position_ids=x["position_ids"]).logits
    return pair_logps(logits, x["labels"], x["segment_ids"])


class Dpo:
    """The DPO side of one worker: beta, the reference log-probabilities, the loss and the evaluation."""

    def __init__(self, beta: float, lora: bool, device: Any):
        self.beta, self.lora, self.device = beta, lora, device
        self.ref: dict[str, np.ndarray] = {}  # full fine-tuning: "train" / "eval" -> [rows, 2], NaN where unused

    def precompute(self, engine: Any, split: str, data: dict[str, Any], rows: np.ndarray, batch: int) -> None:
        """Full fine-tuning, before the first update: the reference log-probabilities of `rows` of `data`.
        Every rank must run the same number of forward passes (ZeRO-3 gathers weights collectively inside
        each): the count is agreed over the ranks and a rank with fewer rows pads with discarded passes."""
        import torch
        import torch.distributed as dist

        count = torch.tensor([math.ceil(len(rows) / batch)], dtype=torch.int64, device=self.device)
        dist.all_reduce(count, op=dist.ReduceOp.MAX)
        out = np.full((len(data["input_ids"]), 2), np.nan)
        engine.eval()
        try:
            with torch.no_grad():
                for part in _batches(np.asarray(rows), batch, int(count.item())):
                    scores = _scores(engine, data, part if len(part) else np.arange(1), self.device)
                    if len(part):
                        out[part] = scores.double().cpu().numpy()
        finally:
            engine.train()
        self.ref[split] = out

    def reference(self, engine: Any, split: str, data: dict[str, Any], rows: Any) -> Any:
        """[len(rows), 2] reference log-probabilities: LoRA's base now, or the precomputed ones."""
        import torch

        if not self.lora:
            ref = self.ref[split][rows]
            assert not np.isnan(ref).any(), f"no reference log-probabilities for {split} rows {rows}"
            return torch.from_numpy(ref).to(self.device)
        was_training = engine.module.training
        # Already off (the evaluator measuring the base): peft's context would switch them back on when it ends.
        off = contextlib.nullcontext() if adapters_off(engine.module) else engine.module.disable_adapter()
        engine.eval()
        try:
            with torch.no_grad(), off:
                return _scores(engine, data, rows, self.device).double()
        finally:
            engine.train(was_training)

    def train_loss(self, engine: Any, data: dict[str, Any], rows: Any) -> Any:
        """The mean DPO loss of a micro-batch (with gradients)."""
        reference = self.reference(engine, "train", data, rows)
        policy = _scores(engine, data, rows, self.device)
        losses, _ = dpo_loss(policy, reference.to(policy.dtype), self.beta)
        return losses.mean()

    def evaluate(
        self, engine: Any, data: dict[str, Any], *, total: int, world: int, batch: int, max_batches: int | None
    ) -> dict[str, float]:
        """DPO loss, preference accuracy and reward margin over the held-out pairs, summed over all ranks."""
        import torch
        import torch.distributed as dist

        sums = torch.zeros(4, dtype=torch.float64, device=self.device)  # loss, preferred, margin, pairs
        for rows in eval_batches(len(data["input_ids"]), total, world=world, batch=batch, max_batches=max_batches):
            real = len(rows) > 0
            rows = rows if real else np.arange(1)  # every rank runs every forward pass (ZeRO-3)
            reference = self.reference(engine, "eval", data, rows) if real or self.lora else None
            engine.eval()
            try:
                with torch.no_grad():
                    policy = _scores(engine, data, rows, self.device)
            finally:
                engine.train()
            if not real:
                continue
            assert reference is not None
            losses, margins = dpo_loss(policy.double(), reference.double(), self.beta)
            preferred = (policy[:, 0] > policy[:, 1]).sum()
            sums += torch.stack(
                [x.double() for x in (losses.sum(), preferred, margins.sum())]
                + [torch.tensor(float(len(rows)), dtype=torch.float64, device=policy.device)]
            )
        dist.all_reduce(sums)
        pairs = sums[3].item()
        if not pairs:
            return {"loss": float("nan"), "preferenceAccuracy": float("nan"), "rewardMargin": float("nan")}
        return {
            "loss": sums[0].item() / pairs,
            "preferenceAccuracy": sums[1].item() / pairs,
            "rewardMargin": sums[2].item() / pairs,
        }


def adapters_off(module: Any) -> bool:
    """Whether peft's LoRA layers of `module` are switched off (inside a disable_adapter context)."""
    for m in module.modules():
        if hasattr(m, "lora_A") and hasattr(m, "disable_adapters"):
            return bool(m.disable_adapters)
    return False


def eval_batches(rows: int, total: int, *, world: int, batch: int, max_batches: int | None) -> list[np.ndarray]:
    """This rank's held-out batches over its own `rows` (its validation shard; `total` over all shards, which
    differ by at most one row), as many on every rank (the last ones short or empty)."""
    count = math.ceil(math.ceil(total / world) / batch)
    if max_batches:
        count = min(count, max_batches)
    return _batches(np.arange(rows), batch, count)


def _batches(rows: np.ndarray, batch: int, count: int) -> list[np.ndarray]:
    """`count` batches of `batch` rows each, the last ones short or empty (a rank with fewer rows still takes
    part in every forward pass)."""
    return [rows[b * batch : (b + 1) * batch] for b in range(count)]
