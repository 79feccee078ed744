"""Prepare the training data once per job: S3 -> records -> clean examples -> tokens -> rows -> shards in S3.

The driver runs prepare() once; each of the W training workers then streams only its own train shard (and the
validation rows it evaluates). The output is content-addressed (cache.py): it lives under
<output.uri>/_kubetune/prepared/<fingerprint>/attempts/<id>/ and is shared by every run of the same data:

    train/part-00000.parquet ... part-<W-1>   exactly W shards with the same number of rows each
    validation/part-00000.parquet ...         W shards whose sizes differ by at most one row
    stats.json                                the DataStats wire fields (what goes to status.data)
    manifest.json                             everything PreparedData holds, plus samples of invalid lines

with <fingerprint>/_COMPLETE, created last and once, naming the attempt that is published. A preparation whose
fingerprint (dataset spec, source ETags and sizes, tokenizer, maxSeqLength, seed, shard count) has a marker
reads no data; the run keeps a copy of the manifest under <run_uri>/prepared/<fingerprint>/.

The pass over the data has three steps (docs/data.md, "Preparation on the cluster"):
1. parse (worker.parse_block), per block of the input (blocks.py), in parallel: read, parse, validate,
   normalise, length-filter, hash;
2. select (selection.py), here, sequential but on a few bytes per record: the mixture, global dedup (first
   occurrence in source order), the validation split;
3. encode (worker.encode_unit), per unit of UNIT_EXAMPLES consecutive selected examples, in parallel: render,
   tokenise, mask, pack.
Steps 1 and 3 run in this process (parallelism 0) or in Ray actors (executors.py): same code, same output.

Memory here: the per-record facts (a status byte and a 64-bit hash per record; with near-dedup the MinHash
signatures) and the packed rows, spilled to local disk (tempfile's directory, TMPDIR) until the row count is
known and the shards are cut.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import os
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kubetune.api import TrainerConfig
from kubetune_trainer.data import cache
from kubetune_trainer.data.blocks import BLOCK_BYTES, Block, plan_blocks
from kubetune_trainer.data.cache import cache_root
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.executors import InlineExecutor, RayExecutor
from kubetune_trainer.data.fingerprint import PREPARED_FORMAT_VERSION, fingerprint, tokenizer_identity
from kubetune_trainer.data.s3 import (
    get_required_bytes,
    join_uri,
    list_objects,
    put_bytes,
    s3_client,
)
from kubetune_trainer.data.selection import Selection, select
from kubetune_trainer.data.shards import batch_indices, load_shard, write_shard
from kubetune_trainer.data.spill import RowSpill
from kubetune_trainer.data.worker import Settings, row_columns

__all__ = ["PreparedData", "prepare", "load_shard", "batch_indices", "DataError"]

log = logging.getLogger(__name__)

# Examples packed together in one task. Rows never span two units, so this (not the parallelism) decides where
# a unit's last row is cut short: the packed rows are the same whatever the number of processes.
UNIT_EXAMPLES = 4096
# Less input than this is prepared in the driver even when parallelism is asked for: a Ray actor's start
# (a process importing transformers and loading the tokenizer) costs seconds, more than a few MB take here.
PARALLEL_MIN_BYTES = 4 << 20


@dataclass
class PreparedData:
    manifest_uri: str
    train_shards: list[str]  # exactly num_shards URIs, same row count each; worker r loads train_shards[r]
    validation_shards: list[str]  # num_shards URIs (sizes differ by at most one row); [] without validation data
    stats: dict[str, Any]  # kubetune.api.DataStats wire fields
    num_train_sequences: int  # rows over all train shards (num_shards * rows_per_shard)
    fingerprint: str
    seq_length: int  # width of every row
    rows_per_shard: int = 0
    num_validation_sequences: int = 0
    dropped_sequences: int = 0  # train rows left out so that every shard has the same count
    task: str = "causal-lm"  # causal-lm (input_ids/labels/...) or sequence-classification (input_ids/label)
    invalid_samples: dict[str, str] = field(default_factory=dict)  # reason -> "s3://... line N"


def prepare(
    cfg: TrainerConfig, tokenizer: Any, num_shards: int, client: Any = None, parallelism: int = 0
) -> PreparedData:
    """Prepare (or reuse) the job's data; see the module docstring. Raises DataError for unusable data.

    parallelism: 0 runs every step in this process; N > 0 parses, tokenises and packs in N Ray actors (Ray
    must be initialised). The output is the same either way."""
    if num_shards < 1:
        raise ValueError("num_shards must be at least 1")
    ds = cfg.spec.dataset
    client = client or s3_client(ds.endpoint, ds.region)
    per_source = [
        _sources(client, src.uri, f"spec.dataset.sources[{i}]" if ds.sources else "spec.dataset.train")
        for i, src in enumerate(ds.train_sources())
    ]
    train_objects = [obj for objs in per_source for obj in objs]
    validation_objects = _sources(client, ds.validation, "spec.dataset.validation") if ds.validation else []
    fp = fingerprint(cfg, train_objects, validation_objects, tokenizer_identity(tokenizer), num_shards)
    root = cache_root(cfg.spec.output.uri)
    manifest = cache.lookup(client, root, fp)
    if manifest is not None:
        log.info("reusing prepared data %s (content-addressed cache)", manifest["manifest_uri"])
    else:
        manifest = _prepare_attempt(cfg, tokenizer, client, per_source, validation_objects, fp, num_shards, parallelism)
    cache.record_for_run(client, cfg.run_uri, fp, manifest)
    return _from_manifest(manifest)


def _prepare_attempt(
    cfg: TrainerConfig,
    tokenizer: Any,
    client: Any,
    per_source: list[list[dict[str, Any]]],
    validation_objects: list[dict[str, Any]],
    fp: str,
    num_shards: int,
    parallelism: int,
) -> dict[str, Any]:
    """Prepare into a folder of this attempt's own, then publish it (or the output of a writer that published
    first); returns the published manifest."""
    ds = cfg.spec.dataset
    root = cache_root(cfg.spec.output.uri)
    prefix = cache.new_attempt(root, fp)
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp, _old_objects_frozen():
        started = time.monotonic()
        run = _rows(cfg, tokenizer, client, per_source, validation_objects, tmp, parallelism)
        log.info(
            "prepare: %d records in %.1f s, %d invalid, %d duplicates, %d filtered",
            run.sel.records,
            time.monotonic() - started,
            run.sel.invalid.total,
            run.sel.duplicates,
            run.filtered,
        )
        has_validation = bool(ds.validation or ds.validation_split)
        manifest = _write_outputs(run, cfg, client, prefix, fp, num_shards, tmp, has_validation)
    published = cache.publish(client, root, fp, manifest["manifest_uri"])
    if published == manifest["manifest_uri"]:
        return manifest
    return json.loads(get_required_bytes(client, published))  # type: ignore[no-any-return]


@contextlib.contextmanager
def _old_objects_frozen() -> Iterator[None]:
    """Leave the objects that exist before the pass (transformers, the tokenizer, the caller's: ~300k) out of
    the garbage collector's full collections while it runs. The pass keeps tens of thousands of objects alive
    at a time (a block's examples), which every 20k records or so sets off a full collection, and each walks
    the whole heap (a tenth of a second). Frozen objects are only skipped, not lost: they are handed back to
    the collector afterwards. A process that froze objects itself (e.g. before forking) is left as it is."""
    if gc.get_freeze_count():
        yield
        return
    gc.freeze()
    try:
        yield
    finally:
        gc.unfreeze()


def _sources(client: Any, uri: str, what: str) -> list[dict[str, Any]]:
    objs = list_objects(client, uri)
    if not objs:
        raise DataError(f"{what}: no data objects at {uri}")
    return objs


@dataclass
class _Run:
    """What a pass over the data produced: the selection's counts and the packed rows of each split."""

    sel: Selection
    spills: dict[str, RowSpill]
    examples: dict[str, int]
    filtered: int  # length filters and truncation
    max_fill: int


def _rows(
    cfg: TrainerConfig,
    tokenizer: Any,
    client: Any,
    per_source: list[list[dict[str, Any]]],
    validation_objects: list[dict[str, Any]],
    tmp: str,
    parallelism: int,
) -> _Run:
    """Parse the blocks (in parallel), select globally (here), tokenise and pack the units (in parallel)."""
    ds = cfg.spec.dataset
    settings = Settings.from_config(cfg)
    blocks: list[Block] = []
    for i, (objs, src) in enumerate(zip(per_source, ds.train_sources())):
        blocks += plan_blocks(client, objs, src.file_format or "auto", i, len(blocks), BLOCK_BYTES)
    blocks += plan_blocks(client, validation_objects, ds.file_format, -1, len(blocks), BLOCK_BYTES)
    executor: InlineExecutor | RayExecutor
    size = sum(b.obj["size"] if b.start is None else (b.end or 0) - b.start for b in blocks)
    if parallelism > 0 and size >= PARALLEL_MIN_BYTES:
        executor = RayExecutor(settings, tokenizer, min(parallelism, len(blocks)))
    else:
        if parallelism > 0:
            log.info("%d bytes of data: prepared in this process (starting Ray actors would take longer)", size)
        os.makedirs(os.path.join(tmp, "parsed"))
        executor = InlineExecutor(settings, tokenizer, client, os.path.join(tmp, "parsed"))
    try:
        t0 = time.monotonic()
        facts = executor.parse(blocks)
        t1 = time.monotonic()
        pp = ds.preprocessing
        weights = [s.weight for s in ds.train_sources()]
        sel = select(
            blocks,
            facts,
            weights,
            pp.deduplicate,
            pp.near_duplicate_threshold,
            ds.validation_split,
            cfg.spec.training.seed,
        )
        if len(weights) > 1:
            log.info(
                "mixture: kept %s examples per source (weights %s); source %s ran out first",
                sel.source_kept,
                weights,
                sel.first_out,
            )
        sel.invalid.check(sel.records, pp.max_invalid_fraction)
        t2 = time.monotonic()
        run = _Run(sel, {}, {}, sel.filtered, 0)
        for split, picks in (("train", sel.train), ("validation", sel.validation)):
            spill = run.spills[split] = RowSpill(os.path.join(tmp, split), row_columns(settings))
            units = (picks[i : i + UNIT_EXAMPLES].tolist() for i in range(0, len(picks), UNIT_EXAMPLES))
            run.examples[split] = 0
            for rows in executor.encode(units, spill):  # in this process: rows written to the spill directly
                for block in rows.blocks:
                    spill.append(block)
                run.examples[split] += rows.examples
                run.filtered += rows.filtered
                run.max_fill = max(run.max_fill, rows.max_fill)
            spill.close()
        log.info(
            "prepare: %d blocks parsed in %.1f s, selected in %.1f s, packed in %.1f s (%s)",
            len(blocks),
            t1 - t0,
            t2 - t1,
            time.monotonic() - t2,
            f"{parallelism} Ray actors" if isinstance(executor, RayExecutor) else "this process",
        )
        return run
    finally:
        executor.close()


def _write_outputs(
    run: _Run, cfg: TrainerConfig, client: Any, prefix: str, fp: str, num_shards: int, tmp: str, has_validation: bool
) -> dict[str, Any]:
    """Cut the rows into shards and write them, stats.json and manifest.json under the attempt's prefix."""
    train_spill = run.spills["train"]
    val_spill = run.spills["validation"]
    n = train_spill.rows
    per_shard = n // num_shards
    if per_shard == 0:
        raise DataError(
            f"only {n} training sequences after preprocessing, fewer than the {num_shards} workers that each "
            f"need one (records read: {run.sel.records}, invalid: {run.sel.invalid.total}, duplicates: "
            f"{run.sel.duplicates}, filtered: {run.filtered})"
        )
    # Rows are only as wide as the longest one actually used (small data does not pay for maxSeqLength).
    width = run.max_fill
    train_uris, tokens = _write_train_shards(run, cfg, client, prefix, num_shards, per_shard, width, tmp)
    val_uris = _write_validation_shards(run, client, prefix, num_shards, width, tmp) if has_validation else []
    stats = {
        "records": run.sel.records,
        "trainRecords": run.examples["train"],
        "validationRecords": run.examples["validation"],
        "duplicatesRemoved": run.sel.duplicates,
        "filtered": run.filtered,
        "invalidRecords": run.sel.invalid.total,
        "invalidByReason": dict(sorted(run.sel.invalid.counts.items())),
        "tokens": tokens,
        "sequences": per_shard * num_shards,
    }
    if len(run.sel.source_kept) > 1:
        stats["sourceRecords"] = run.sel.source_kept
    prepared = PreparedData(
        manifest_uri=join_uri(prefix, "manifest.json"),
        train_shards=train_uris,
        validation_shards=val_uris,
        stats=stats,
        num_train_sequences=per_shard * num_shards,
        fingerprint=fp,
        seq_length=width,
        rows_per_shard=per_shard,
        num_validation_sequences=val_spill.rows if val_uris else 0,
        dropped_sequences=n - per_shard * num_shards,
        task=cfg.spec.model.task,
        invalid_samples=dict(sorted(run.sel.invalid.samples.items())),
    )
    put_bytes(client, join_uri(prefix, "stats.json"), json.dumps(stats, indent=2).encode(), "application/json")
    manifest = {"formatVersion": PREPARED_FORMAT_VERSION, **asdict(prepared)}
    put_bytes(client, prepared.manifest_uri, json.dumps(manifest, indent=2).encode(), "application/json")
    log.info(
        "prepared %d train sequences (%d per shard, %d dropped), %d validation, width %d, under %s",
        prepared.num_train_sequences,
        per_shard,
        prepared.dropped_sequences,
        prepared.num_validation_sequences,
        width,
        prefix,
    )
    return manifest


def _write_train_shards(
    run: _Run, cfg: TrainerConfig, client: Any, prefix: str, num_shards: int, per_shard: int, width: int, tmp: str
) -> tuple[list[str], int]:
    """The training shards (their URIs, and the tokens they hold). Rows are shuffled across shards (files are
    often sorted by source or topic) and the remainder dropped at random rather than always the tail; each
    shard's rows are read in sorted order for locality."""
    n = run.spills["train"].rows
    perm = np.random.default_rng(np.random.SeedSequence([cfg.spec.training.seed, 7919])).permutation(n)
    cols = run.spills["train"].read()
    uris, tokens = [], 0
    for r in range(num_shards):
        rows = np.sort(perm[r * per_shard : (r + 1) * per_shard])
        uri = join_uri(prefix, "train", f"part-{r:05d}.parquet")
        tokens += write_shard(cols, rows, width, os.path.join(tmp, "shard.parquet"), client, uri)
        uris.append(uri)
    return uris, tokens


def _write_validation_shards(run: _Run, client: Any, prefix: str, num_shards: int, width: int, tmp: str) -> list[str]:
    """The held-out shards, one per worker, in order."""
    spill = run.spills["validation"]
    if spill.rows == 0:
        # Too little data for the split to hold anything out: say so, and train without evaluation rather
        # than hand the trainer empty evaluation shards.
        log.warning("no validation sequences (validationSplit on %d records held none out)", run.sel.records)
        return []
    cols = spill.read()
    uris = []
    for r, rows in enumerate(np.array_split(np.arange(spill.rows), num_shards)):
        uri = join_uri(prefix, "validation", f"part-{r:05d}.parquet")
        write_shard(cols, rows, width, os.path.join(tmp, "shard.parquet"), client, uri)
        uris.append(uri)
    return uris


def _from_manifest(manifest: dict[str, Any]) -> PreparedData:
    manifest = dict(manifest)
    manifest.pop("formatVersion", None)
    return PreparedData(**manifest)
