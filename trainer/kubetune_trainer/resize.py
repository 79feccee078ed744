"""Resuming a checkpoint on a different number of ranks (a preempted job that comes back smaller or larger).

DeepSpeed 0.19.8 does not re-partition a ZeRO checkpoint for a new world size (ZeRO-2's elastic_checkpoint is
refused at load, and `ds_to_universal` fails on torch AdamW's optimizer-state layout), so what fits:

- Weights: the fp32 weights are rebuilt from the ZeRO-2 shards of every old rank (DeepSpeed's zero_to_fp32,
  which reads any world size), loaded into the new engine's module, and the optimizer's fp32 partitions
  refreshed from them. The LR schedule and step counters come from the checkpoint. Adam's moment estimates
  start again from zero (they are partitioned by the old world size): the loss curve continues, the first
  steps move like the first steps after a warm restart. ZeRO-3 checkpoints resize only through the same
  reconstruction of the weights, which is not wired here: they are refused with a clear message.
- Data: a checkpoint says, per old rank, how far into its shard's permutation of the current epoch it got.
  The new run's data is prepared for the new number of ranks (other shards), so the rest of the interrupted
  epoch is the new rank's permuted rows minus every row the old ranks had consumed (identified by content:
  the packed rows are the same rows, only shared out differently), cut to the same number of micro-batches on
  every rank. Later epochs are the new layout's as usual. No record is trained on twice.
- Randomness: new rank r continues old rank r mod N's RNG states.

A checkpoint written in the middle of such a shortened epoch records it (TrainState.resized), so resuming it
again on the same number of ranks recomputes the same shortened epoch; resizing again before that epoch ends
is refused.
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_DS_TAG = "ds"


def load_resized(
    engine: Any,
    uri: str,
    state: Any,
    *,
    rank: int,
    world: int,
    client: Any,
    staging: Path,
    exclude_frozen: bool,
    zero_stage: int,
    fingerprint: str,
) -> Any:
    """Restore weights, schedule, counters and RNG of checkpoint `uri` written by `state.world_size` ranks
    into this `world`-rank engine; returns the TrainState, marked as resized (see the module docstring)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    from kubetune_trainer import storage
    from kubetune_trainer.checkpoint import set_rng_states

    old = state.world_size
    if zero_stage != 2:
        raise RuntimeError(
            f"checkpoint {uri} was written by {old} ranks and this run has {world}: only ZeRO-2 "
            f"checkpoints resume on a different number of ranks (this run is ZeRO-{zero_stage}). "
            f"Use {old} ranks, or write to a new output.uri to start over."
        )
    if state.resized and state.resized.get("epoch") == state.epoch:
        raise RuntimeError(
            f"checkpoint {uri} is in an epoch already shortened by a resize from "
            f"{state.resized['world']} ranks; resume it on {old} ranks until that epoch ends"
        )
    local = staging / f"resize-rank-{rank}"
    shutil.rmtree(local, ignore_errors=True)
    rng = f"rng/rank-{rank % old:05d}.pt"
    storage.download(client, uri, local, want=lambda rel: rel.startswith(f"{_DS_TAG}/") or rel == rng)
    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(local), tag=_DS_TAG, exclude_frozen_parameters=exclude_frozen
    )
    module = engine.module
    missing = [n for n, p in module.named_parameters() if p.requires_grad and n not in weights]
    if missing:
        raise RuntimeError(f"checkpoint {uri} lacks trainable weights {missing[:3]}")
    with torch.no_grad():
        params = dict(module.named_parameters())
        for name, value in weights.items():
            if name in params:
                params[name].copy_(value.to(params[name].dtype))
    engine.optimizer.refresh_fp32_params()  # the optimizer's fp32 partitions from the loaded weights
    saved = torch.load(next((local / _DS_TAG).glob("mp_rank_00_model_states.pt")), weights_only=False)
    if engine.lr_scheduler is not None and saved.get("lr_scheduler"):
        engine.lr_scheduler.load_state_dict(saved["lr_scheduler"])
    engine.global_steps = saved.get("global_steps", engine.global_steps)
    engine.global_samples = saved.get("global_samples", engine.global_samples)
    set_rng_states(torch.load(local / rng, weights_only=False))
    shutil.rmtree(local, ignore_errors=True)
    state.resized = {
        "epoch": state.epoch,
        "world": old,
        "micro": state.micro_batch,
        "fingerprint": state.data_fingerprint,
    }
    log.info(
        "resized %s from %d to %d ranks: weights, schedule and RNG restored, Adam moments restarted; "
        "epoch %d continues without the rows the %d old ranks had trained on",
        uri,
        old,
        world,
        state.epoch,
        old,
    )
    state.world_size, state.micro_batch, state.data_fingerprint = world, 0, fingerprint
    return state


def consumed_rows(
    manifest: dict[str, Any], resized: dict[str, Any], *, batch: int, seed: int, client: Any
) -> set[bytes]:
    """Content (input_ids bytes) of every row the old ranks trained on in the resized epoch."""
    from kubetune_trainer.data import batch_indices, load_shard

    done: set[bytes] = set()
    for shard in manifest["train_shards"]:
        ids = load_shard([shard], client)["input_ids"]
        for rows in batch_indices(len(ids), batch, resized["epoch"], seed)[: resized["micro"]]:
            done.update(ids[r].tobytes() for r in rows)
    return done


def remaining_batches(
    input_ids: np.ndarray, consumed: set[bytes], *, batch: int, epoch: int, seed: int
) -> list[np.ndarray]:
    """This rank's batches of `epoch` in its usual order, without the consumed rows (not yet cut to the
    ranks' common length)."""
    from kubetune_trainer.data import batch_indices

    order = np.concatenate(batch_indices(len(input_ids), 1, epoch, seed)) if len(input_ids) else np.array([], int)
    keep = np.array([r for r in order if input_ids[r].tobytes() not in consumed], dtype=np.int64)
    return [keep[i * batch : (i + 1) * batch] for i in range(len(keep) // batch)]


def written_state(client: Any, uri: str) -> Any:
    """The TrainState checkpoint `uri` was written with (to see its world size before loading anything)."""
    from kubetune_trainer import storage
    from kubetune_trainer.checkpoint import TrainState

    return TrainState.from_json(storage.get_json(client, f"{uri}/trainer_state.json"))


def resized_epoch(
    input_ids: np.ndarray, state: Any, *, run_uri: str, batch: int, accum: int, seed: int, client: Any
) -> list[np.ndarray]:
    """This rank's micro-batches for the rest of the epoch begun on another number of ranks, cut to the
    number every rank has (a collective: all ranks call it at the same point)."""
    import torch
    import torch.distributed as dist

    from kubetune_trainer import storage

    resized = state.resized
    manifest = storage.get_json(client, f"{run_uri}/prepared/{resized['fingerprint']}/manifest.json")
    consumed = consumed_rows(manifest, resized, batch=batch, seed=seed, client=client)
    mine = remaining_batches(input_ids, consumed, batch=batch, epoch=state.epoch, seed=seed)
    common = torch.tensor(len(mine))
    dist.all_reduce(common, op=dist.ReduceOp.MIN)
    cut = int(common) // accum * accum
    log.info(
        "epoch %d after the resize: %d rows consumed before, %d micro-batches left on each rank",
        state.epoch,
        len(consumed),
        cut,
    )
    return mine[:cut]
