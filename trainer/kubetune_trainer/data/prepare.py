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

Then the driver plans the shards from the row count alone (shards.train_shard_rows: a seeded shuffle into
equal shards) and the executor writes them where the rows are: in this process from the rows spilled to local
disk (tempfile's directory, TMPDIR), or in the actors from the rows they left in Ray's object store.

Memory here: the per-record facts (a status byte and a 64-bit hash per record; with near-dedup the MinHash
signatures) and the shard plan (a few bytes per row); with Ray actors, no row.
"""

from __future__ import annotations

import contextlib
import gc
import json
import logging
import tempfile
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

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
from kubetune_trainer.data.shards import batch_indices, load_shard, train_shard_rows, validation_shard_rows
from kubetune_trainer.data.worker import Settings

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
    with (
        tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp,
        _old_objects_frozen(),
        _executor(cfg, tokenizer, client, per_source, validation_objects, tmp, parallelism) as (executor, blocks),
    ):
        started = time.monotonic()
        run = _rows(cfg, executor, blocks)
        log.info(
            "prepare: %d records in %.1f s, %d invalid, %d duplicates, %d filtered",
            run.sel.records,
            time.monotonic() - started,
            run.sel.invalid.total,
            run.sel.duplicates,
            run.filtered,
        )
        has_validation = bool(ds.validation or ds.validation_split)
        manifest = _write_outputs(run, cfg, executor, client, prefix, fp, num_shards, has_validation)
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
    """What a pass over the data produced: the selection's counts and the packed rows of each split (the rows
    themselves stay with the executor)."""

    sel: Selection
    rows: dict[str, int]
    examples: dict[str, int]
    filtered: int  # length filters and truncation
    max_fill: int


@contextlib.contextmanager
def _executor(
    cfg: TrainerConfig,
    tokenizer: Any,
    client: Any,
    per_source: list[list[dict[str, Any]]],
    validation_objects: list[dict[str, Any]],
    tmp: str,
    parallelism: int,
) -> Iterator[tuple[InlineExecutor | RayExecutor, list[Block]]]:
    """The blocks of the input and the executor that works on them (closed on the way out)."""
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
        executor = InlineExecutor(settings, tokenizer, client, tmp)
    try:
        yield executor, blocks
    finally:
        executor.close()


def _rows(cfg: TrainerConfig, executor: InlineExecutor | RayExecutor, blocks: list[Block]) -> _Run:
    """Parse the blocks (in parallel), select globally (here), tokenise and pack the units (in parallel)."""
    ds = cfg.spec.dataset
    t0 = time.monotonic()
    facts = executor.parse(blocks)
    t1 = time.monotonic()
    pp = ds.preprocessing
    weights = [s.weight for s in ds.train_sources()]
    sel = select(blocks, facts, weights, pp.deduplicate, pp.near_duplicate_threshold)
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
        units = (picks[i : i + UNIT_EXAMPLES].tolist() for i in range(0, len(picks), UNIT_EXAMPLES))
        run.rows[split] = run.examples[split] = 0
        for unit in executor.encode(split, units):
            run.rows[split] += unit.rows
            run.examples[split] += unit.examples
            run.filtered += unit.filtered
            run.max_fill = max(run.max_fill, unit.max_fill)
    log.info(
        "prepare: %d blocks parsed in %.1f s, selected in %.1f s, packed in %.1f s (%s)",
        len(blocks),
        t1 - t0,
        t2 - t1,
        time.monotonic() - t2,
        f"{len(executor.actors)} Ray actors" if isinstance(executor, RayExecutor) else "this process",
    )
    return run


def _write_outputs(
    run: _Run,
    cfg: TrainerConfig,
    executor: InlineExecutor | RayExecutor,
    client: Any,
    prefix: str,
    fp: str,
    num_shards: int,
    has_validation: bool,
) -> dict[str, Any]:
    """Cut the rows into shards and write them, stats.json and manifest.json under the attempt's prefix."""
    n = run.rows["train"]
    per_shard = n // num_shards
    if per_shard == 0:
        raise DataError(
            f"only {n} training sequences after preprocessing, fewer than the {num_shards} workers that each "
            f"need one (records read: {run.sel.records}, invalid: {run.sel.invalid.total}, duplicates: "
            f"{run.sel.duplicates}, filtered: {run.filtered})"
        )
    # Rows are only as wide as the longest one actually used (small data does not pay for maxSeqLength).
    width = run.max_fill
    train_uris = _shard_uris(prefix, "train", num_shards)
    tokens = sum(executor.write("train", train_shard_rows(n, num_shards, cfg.spec.training.seed), width, train_uris))
    val_uris: list[str] = []
    if has_validation and run.rows["validation"] == 0:
        # Too little data for the split to hold anything out: say so, and train without evaluation rather
        # than hand the trainer empty evaluation shards.
        log.warning("no validation sequences (validationSplit on %d records held none out)", run.sel.records)
    elif has_validation:
        val_uris = _shard_uris(prefix, "validation", num_shards)
        executor.write("validation", validation_shard_rows(run.rows["validation"], num_shards), width, val_uris)
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
        num_validation_sequences=run.rows["validation"] if val_uris else 0,
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


def _shard_uris(prefix: str, split: str, num_shards: int) -> list[str]:
    return [join_uri(prefix, split, f"part-{r:05d}.parquet") for r in range(num_shards)]


def _from_manifest(manifest: dict[str, Any]) -> PreparedData:
    manifest = dict(manifest)
    manifest.pop("formatVersion", None)
    return PreparedData(**manifest)
