"""Resuming a checkpoint on a different number of ranks (a preempted job that comes back smaller or larger).

DeepSpeed 0.19.8 does not re-partition a ZeRO checkpoint for a new world size (ZeRO-2's elastic_checkpoint is
refused at load, and `ds_to_universal` fails on torch AdamW's optimizer-state layout), so what fits, for
ZeRO-2 and ZeRO-3 alike:

- Weights: rank 0 alone downloads every old rank's shards and rebuilds the fp32 weights from them (DeepSpeed's
  zero_to_fp32, which reads ZeRO-2 and ZeRO-3 checkpoints of any world size; in its lazy mode, so that from a
  ZeRO-3 checkpoint each parameter is assembled only when it is loaded, while ZeRO-2's reconstruction holds all
  the fp32 weights at once: either way rank 0's CPU memory holds them at most once). Every rank then takes
  the parameters one by one in the same order: a ZeRO-3 parameter through `GatheredParameters(modifier_rank=0)`
  (gathered, written by rank 0, and on leaving broadcast and re-partitioned into every rank's `ds_tensor`), a
  ZeRO-2 one (whole on every rank) written by rank 0 and broadcast. So no rank's device holds more than one
  gathered parameter beyond its usual share. The optimizer's fp32 partitions are then refreshed from the 16-bit
  ones (under ZeRO-3 these are views of the same flat buffer as the parameters' `ds_tensor`s). The LR schedule
  and step counters come from the checkpoint's model states (read by rank 0, broadcast); the other ranks
  download only their RNG file. Adam's moment estimates and step count follow the same way, one parameter at
  a time (adam_moments.py); moments that cannot be read restart from zero, with a warning. LoRA
  checkpoints hold only the trainable weights (the frozen ones are the base model's, already loaded); a
  trainable weight missing from the checkpoint is an error on every rank.
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

import contextlib
import logging
import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

_DS_TAG = "ds"
# The file with the LR scheduler and engine counters: ZeRO-2 writes it once, ZeRO-3 once per rank (the same
# names DeepSpeed's zero_to_fp32.get_model_state_file looks for).
_MODEL_STATES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")
_ENGINE_STATE = ("lr_scheduler", "global_steps", "global_samples")


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
    into this `world`-rank engine; returns the TrainState, marked as resized (see the module docstring).
    A collective: every rank calls it at the same point."""
    import torch

    from kubetune_trainer import storage
    from kubetune_trainer.checkpoint import set_rng_states

    old = state.world_size
    _refuse_unresizable(uri, state, world=world, zero_stage=zero_stage)
    local = staging / f"resize-rank-{rank}"
    shutil.rmtree(local, ignore_errors=True)
    rng = f"rng/rank-{rank % old:05d}.pt"
    # Rank 0 rebuilds the weights from every old rank's shards; the others need only their RNG file.
    storage.download(client, uri, local, want=lambda rel: rel == rng or (rank == 0 and rel.startswith(f"{_DS_TAG}/")))
    saved = _load_weights(engine, local / _DS_TAG, uri, rank=rank, world=world, exclude_frozen=exclude_frozen)
    moments = _load_moments(engine, local / _DS_TAG, uri, rank=rank, world=world)
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
        "resized %s from %d to %d ranks (ZeRO-%d): weights, %s, schedule and RNG restored; epoch %d "
        "continues without the rows the %d old ranks had trained on",
        uri,
        old,
        world,
        zero_stage,
        "Adam's moments" if moments else "not Adam's moments (restarted)",
        state.epoch,
        old,
    )
    state.world_size, state.micro_batch, state.data_fingerprint = world, 0, fingerprint
    return state


def _refuse_unresizable(uri: str, state: Any, *, world: int, zero_stage: int) -> None:
    """Raise when checkpoint `uri` cannot continue on `world` ranks."""
    old = state.world_size
    if zero_stage not in (2, 3):
        raise RuntimeError(
            f"checkpoint {uri} was written by {old} ranks and this run has {world}: only ZeRO-2 and ZeRO-3 "
            f"checkpoints resume on a different number of ranks (this run is ZeRO-{zero_stage}). "
            f"Use {old} ranks, or write to a new output.uri to start over."
        )
    if state.resized and state.resized.get("epoch") == state.epoch:
        raise RuntimeError(
            f"checkpoint {uri} is in an epoch already shortened by a resize from "
            f"{state.resized['world']} ranks; resume it on {old} ranks until that epoch ends"
        )


def _load_weights(engine: Any, ds_dir: Path, uri: str, *, rank: int, world: int, exclude_frozen: bool) -> Any:
    """Every rank: the checkpoint's weights into the engine's module (rank 0 reads them from `ds_dir`, which
    only it has downloaded) and the optimizer's fp32 partitions refreshed; returns the engine state (LR
    scheduler, counters) rank 0 read. A collective."""
    import torch
    import torch.distributed as dist

    module = engine.module
    weights: dict[str, Any] = {}
    shared: list[Any] = [None, [], {}]  # error, names of the parameters to load (in module order), engine state
    if rank == 0:
        try:
            weights, shared[1], shared[2] = _read_checkpoint(ds_dir, module, exclude_frozen)
        except Exception as exc:  # told to every rank, so that none waits for weights that never come
            if world == 1:
                raise
            log.exception("cannot rebuild the weights of checkpoint %s", uri)
            shared[0] = f"cannot rebuild the weights of checkpoint {uri} (see rank 0's log): {exc}"
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    error, names, saved = shared
    if error:
        raise RuntimeError(error)
    params = dict(module.named_parameters())
    missing = [n for n, p in params.items() if p.requires_grad and n not in names]
    if missing:
        raise RuntimeError(f"checkpoint {uri} lacks trainable weights {missing[:3]}")
    with torch.no_grad():
        for name in names:  # one parameter at a time: never the whole gathered model on a device
            param = params[name]
            with _written_by_rank_0(param, world=world):
                if rank == 0:
                    param.data.copy_(weights.pop(name).contiguous().to(param.dtype))
    weights.clear()
    engine.optimizer.refresh_fp32_params()  # the optimizer's fp32 partitions from the loaded weights
    return saved


def _read_checkpoint(
    ds_dir: Path, module: Any, exclude_frozen: bool
) -> tuple[dict[str, Any], list[str], dict[str, Any]]:
    """Rank 0: the checkpoint's fp32 weights (lazy: each value's `.contiguous()` assembles it from the old
    ranks' shards), the names of this module's parameters it has, and the engine state (LR scheduler,
    counters)."""
    import torch
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

    weights = get_fp32_state_dict_from_zero_checkpoint(
        str(ds_dir.parent), tag=ds_dir.name, exclude_frozen_parameters=exclude_frozen, lazy_mode=True
    )
    names = [n for n, _ in module.named_parameters() if n in weights]
    path = next((ds_dir / f for f in _MODEL_STATES if (ds_dir / f).exists()), None)
    if path is None:
        raise FileNotFoundError(f"no model states ({' or '.join(_MODEL_STATES)}) in {ds_dir}")
    saved = torch.load(path, map_location="cpu", mmap=True, weights_only=False)  # ZeRO-2: + the 16-bit weights
    return weights, names, {k: saved[k] for k in _ENGINE_STATE if k in saved}


def _load_moments(engine: Any, ds_dir: Path, uri: str, *, rank: int, world: int) -> bool:
    """Every rank: Adam's moments and step count from the checkpoint (rank 0 reads them from `ds_dir`) into
    the engine's optimizer; whether they were. Moments that cannot be read (an optimizer whose state is laid
    out otherwise) restart from zero, as the first steps of a run do, rather than fail the resume. A
    collective."""
    import torch.distributed as dist

    from kubetune_trainer import adam_moments

    names = [n for n, p in engine.module.named_parameters() if p.requires_grad]
    moments: dict[str, Any] = {}
    shared: list[Any] = [None]  # Adam's step, or None when the moments could not be read
    if rank == 0:
        try:
            moments, step = adam_moments.read_moments(ds_dir)
            missing = [n for n in names if any(n not in moments[key] for key in adam_moments.MOMENTS)]
            if missing:
                raise KeyError(f"no moments for {missing[:3]}")
            shared[0] = step
        except Exception as exc:  # noqa: BLE001 - the weights are restored; the moments are worth a warning
            log.warning("cannot read Adam's moments from %s (%s: %s): they restart", uri, type(exc).__name__, exc)
    if world > 1:
        dist.broadcast_object_list(shared, src=0)
    if shared[0] is None:
        return False
    adam_moments.load_moments(engine, moments, names, shared[0], rank=rank, world=world)
    return True


@contextlib.contextmanager
def _written_by_rank_0(param: Any, *, world: int) -> Iterator[None]:
    """Inside: `param.data` is the whole parameter, for rank 0 to write. On leaving, every rank has rank 0's
    value: a ZeRO-3 parameter (partitioned: it has a `ds_id`) is gathered and rank 0's value re-partitioned into
    every rank's `ds_tensor` (GatheredParameters with modifier_rank=0); ZeRO-2 keeps whole parameters on every
    rank, so rank 0's is broadcast."""
    if hasattr(param, "ds_id"):
        import deepspeed

        with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
            yield
        return
    yield
    if world > 1:
        import torch
        import torch.distributed as dist

        dist.broadcast(param.data.view(-1).view(torch.uint8), src=0)  # bytes: any dtype, any backend


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
