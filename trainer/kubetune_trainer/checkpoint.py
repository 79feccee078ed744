"""Checkpoints in S3 that resume a run exactly, and the rule for which one to resume from.

Layout of one checkpoint, `<run_uri>/checkpoints/step-00000040/`:

    ds/                        DeepSpeed's own files (tag "ds"): mp_rank_00_model_states.pt (module weights;
                               with LoRA only the trainable ones, plus the LR scheduler and engine counters),
                               *zero_pp_rank_<r>_*optim_states.pt (rank r's ZeRO shard of the optimizer, and
                               under ZeRO-3 zero_pp_rank_<r>_*model_states.pt with its shard of the weights)
    rng/rank-00000.pt          python, numpy and torch (and CUDA) RNG states of each rank
    trainer_state.json         step, epoch, micro-batch position in the epoch, samples/tokens consumed, early
                               stopping state, world size, data fingerprint
    config.json                the resolved trainer config the run used
    _uploaded/<token>/rank-NNNNN  each rank's "all my files are up" marker (token: the worker group's start)
    _COMPLETE                  written last, by rank 0, after every rank's marker is there; it names the job
                               incarnation (uid) that wrote it

Every rank writes its files to node-local disk (the staging folder) and uploads them itself, in the
background (kubetune_trainer.checkpoint_upload), so this works when ranks sit on different nodes with no shared
disk, and training goes on while the files travel. A checkpoint without `_COMPLETE` is never resumed from: a
run that dies while writing step 40 resumes from step 30, and the half-written step-00000040 (everything newer
than the checkpoint resumed from) is deleted before any rank saves again (`discard_after`).
"""

from __future__ import annotations

import dataclasses
import logging
import random
import re
import shutil
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from kubetune.api import CheckpointRef, TrainerConfig
from kubetune.clock import now_rfc3339
from kubetune_trainer import storage

if TYPE_CHECKING:
    from kubetune_trainer.checkpoint_upload import Uploads

log = logging.getLogger(__name__)

COMPLETE = "_COMPLETE"
_FOLDER = re.compile(r"^step-(\d{8})$")
_DS_TAG = "ds"


@dataclass
class TrainState:
    """Where the loop is, besides the model, optimizer and scheduler (which DeepSpeed saves)."""

    step: int = 0  # optimizer steps done
    epoch: int = 0  # current epoch (0-based)
    micro_batch: int = 0  # micro-batches of `epoch` already consumed on each rank
    samples: int = 0  # sequences consumed over all ranks
    tokens: int = 0  # non-padding tokens consumed over all ranks
    best_eval_loss: float | None = None
    evals_without_improvement: int = 0
    last_eval_loss: float | None = None
    last_eval_step: int | None = None
    stop_reason: str | None = None  # set once the run has finished (or stopped early)
    world_size: int = 1
    data_fingerprint: str = ""
    # Set when this run resumed a checkpoint of another number of ranks: {epoch, world, micro, fingerprint}
    # of the epoch it shortened (kubetune_trainer.resize).
    resized: dict[str, Any] | None = None

    def to_json(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> TrainState:
        known = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def checkpoint_uri(cfg: TrainerConfig, step: int) -> str:
    return f"{cfg.checkpoints_uri}/step-{step:08d}"


def _scan(client: Any, cfg: TrainerConfig) -> dict[int, bool]:
    """step -> whether that checkpoint is complete, from one listing of every key under checkpoints/.

    Keys rather than folders: some S3 servers (SeaweedFS) keep a folder listed after its last object is
    deleted, and an empty folder is not a checkpoint.
    """
    steps: dict[int, bool] = {}
    for obj in storage.list_keys(client, cfg.checkpoints_uri):
        folder, _, rest = obj["rel"].partition("/")
        m = _FOLDER.match(folder)
        if m and rest:
            step = int(m.group(1))
            steps[step] = steps.get(step, False) or rest == COMPLETE
    return steps


def find_latest(client: Any, cfg: TrainerConfig) -> str | None:
    """URI of the newest checkpoint that has its _COMPLETE marker and was written by this job incarnation, or
    None.

    Identity: the run prefix already holds the job's uid (kubetune.api.run_uri); the marker's uid is checked
    too, so a checkpoint copied or left under this prefix by another incarnation is never resumed from.
    """
    steps = _scan(client, cfg)
    complete = sorted((step for step, done in steps.items() if done), reverse=True)
    latest = None
    for step in complete:
        marker = storage.get_json(client, f"{checkpoint_uri(cfg, step)}/{COMPLETE}")
        uid = marker.get("jobUid")
        if cfg.job.uid and uid and uid != cfg.job.uid:
            log.warning(
                "ignoring checkpoint %s: written by another incarnation of %s/%s (uid %s, this one is %s)",
                checkpoint_uri(cfg, step),
                cfg.job.namespace,
                cfg.job.name,
                uid,
                cfg.job.uid,
            )
            continue
        latest = step
        break
    for step in sorted(steps):
        if not steps[step] and (latest is None or step > latest):
            log.warning("ignoring incomplete checkpoint %s (no %s marker)", checkpoint_uri(cfg, step), COMPLETE)
    return checkpoint_uri(cfg, latest) if latest is not None else None


def rng_states() -> dict[str, Any]:
    import numpy as np
    import torch

    states = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        states["cuda"] = torch.cuda.get_rng_state_all()
    return states


def set_rng_states(states: dict[str, Any]) -> None:
    import numpy as np
    import torch

    random.setstate(states["python"])
    np.random.set_state(states["numpy"])
    torch.set_rng_state(states["torch"])
    if "cuda" in states and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(states["cuda"])


def write_local(
    engine: Any, cfg: TrainerConfig, state: TrainState, *, rank: int, staging: Path, exclude_frozen: bool
) -> Path:
    """Write this rank's files of the checkpoint of `state.step` to node-local disk (collective: every rank
    calls it; DeepSpeed's save synchronises the ranks); returns the folder."""
    import json

    import torch

    local = staging / f"checkpoint-{state.step:08d}-rank-{rank}"
    shutil.rmtree(local, ignore_errors=True)
    (local / "rng").mkdir(parents=True)
    engine.save_checkpoint(str(local), tag=_DS_TAG, save_latest=False, exclude_frozen_parameters=exclude_frozen)
    torch.save(rng_states(), local / "rng" / f"rank-{rank:05d}.pt")
    if rank == 0:
        (local / "trainer_state.json").write_text(json.dumps(state.to_json(), indent=1))
        (local / "config.json").write_text(json.dumps(cfg.wire(), indent=1))
    return local


def save(
    engine: Any,
    cfg: TrainerConfig,
    state: TrainState,
    *,
    rank: int,
    uploads: Uploads,
    staging: Path,
    exclude_frozen: bool,
) -> str:
    """Checkpoint `state.step` (collective): written locally now, uploaded to S3 in the background by
    `uploads`, which marks it complete once every rank's files are up. Returns its URI."""
    uri = checkpoint_uri(cfg, state.step)
    local = write_local(engine, cfg, state, rank=rank, staging=staging, exclude_frozen=exclude_frozen)
    marker = {
        "step": state.step,
        "evalLoss": state.last_eval_loss if state.last_eval_step == state.step else None,
        "time": now_rfc3339(),
        "worldSize": state.world_size,
        "jobUid": cfg.job.uid,  # which incarnation wrote it (find_latest resumes only its own)
    }
    uploads.submit(local, uri, marker)  # waits for the previous checkpoint's upload first
    return uri


def discard_after(client: Any, cfg: TrainerConfig, latest: str | None) -> list[int]:
    """Delete every checkpoint newer than `latest` (the one this attempt resumes from; None: all of them):
    debris of a dead attempt, which no later attempt may resume from and whose files (and per-rank upload
    markers) must not mix with the ones this attempt writes at the same steps. Rank 0, before any rank saves.
    Returns the steps deleted."""
    newest = int(latest.rsplit("step-", 1)[1]) if latest else -1
    doomed = sorted(step for step in _scan(client, cfg) if step > newest)
    for step in doomed:
        uri = checkpoint_uri(cfg, step)
        storage.delete(client, f"{uri}/{COMPLETE}")  # first: a deletion cut short leaves it incomplete
        storage.delete_prefix(client, uri)
        log.info("removed checkpoint %s of an earlier attempt (newer than the one resumed from)", uri)
    return doomed


def load(
    engine: Any, uri: str, *, rank: int, world_size: int, client: Any, staging: Path, exclude_frozen: bool
) -> TrainState:
    """Restore engine (weights, optimizer, scheduler), RNG states and loop position from checkpoint `uri`."""
    import torch

    state = TrainState.from_json(storage.get_json(client, f"{uri}/trainer_state.json"))
    if state.world_size != world_size:
        raise RuntimeError(
            f"checkpoint {uri} was written by {state.world_size} workers but this run has {world_size}: "
            "DeepSpeed ZeRO shards load only into the same number of workers. Set spec.resources.workers "
            f"back to {state.world_size}, or write to a new output.uri to start over."
        )
    local = staging / f"load-rank-{rank}"
    shutil.rmtree(local, ignore_errors=True)
    mine = f"rng/rank-{rank:05d}.pt"
    # ZeRO-1/2 read every rank's optimizer file (they are merged to allow elastic resizing), so all of ds/.
    storage.download(client, uri, local, want=lambda rel: rel.startswith(f"{_DS_TAG}/") or rel == mine)
    load_path, _ = engine.load_checkpoint(
        str(local),
        tag=_DS_TAG,
        load_module_strict=not exclude_frozen,
        load_optimizer_states=True,
        load_lr_scheduler_states=True,
    )
    if load_path is None:
        raise RuntimeError(f"DeepSpeed could not load checkpoint {uri}")
    set_rng_states(torch.load(local / mine, weights_only=False))
    shutil.rmtree(local, ignore_errors=True)
    return state


def apply_retention(client: Any, cfg: TrainerConfig, keep: int) -> list[CheckpointRef]:
    """Delete all but the newest `keep` complete checkpoints, and incomplete ones older than the newest
    complete one (debris of failed attempts). Returns the kept ones, newest first. Rank 0 only."""
    steps = _scan(client, cfg)
    complete = sorted(step for step, done in steps.items() if done)
    incomplete = sorted(step for step, done in steps.items() if not done)
    newest = complete[-1] if complete else -1
    doomed = complete[:-keep] + [s for s in incomplete if s < newest]
    for step in doomed:
        uri = checkpoint_uri(cfg, step)
        # The marker goes first: a deletion cut short must leave an incomplete checkpoint, never a
        # "complete" one with files missing.
        storage.delete(client, f"{uri}/{COMPLETE}")
        storage.delete_prefix(client, uri)
    refs = []
    for step in reversed(complete[-keep:]):
        uri = checkpoint_uri(cfg, step)
        marker = storage.get_json(client, f"{uri}/{COMPLETE}")
        refs.append(CheckpointRef(step=step, uri=uri, eval_loss=marker.get("evalLoss"), time=marker.get("time")))
    return refs
