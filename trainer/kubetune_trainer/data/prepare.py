"""Prepare the training data once per job: S3 -> records -> clean examples -> tokens -> rows -> shards in S3.

The driver runs prepare() once; each of the W training workers then loads only its own train shard (and the
small validation shards). The output lives under <run_uri>/prepared/<fingerprint>/:

    train/part-00000.parquet ... part-<W-1>   exactly W shards with the same number of rows each
    validation/part-00000.parquet ...         W shards whose sizes differ by at most one row
    stats.json                                the DataStats wire fields (what goes to status.data)
    manifest.json                             everything PreparedData holds, plus samples of invalid lines
    _COMPLETE                                 written last: its presence means the rest is whole

A rerun with the same fingerprint (dataset spec, source ETags and sizes, tokenizer, maxSeqLength, seed, shard
count) finds _COMPLETE and returns the manifest without reading the data again; a folder without it is the
leftover of a failed attempt and is deleted and redone.

Memory: records stream through in batches of BATCH_RECORDS; packed rows are spilled to local disk (tempfile's
directory, TMPDIR) until the row count is known; only the dedup hash set (and, with near-dedup, MinHash
signatures) grows with the number of records.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import tempfile
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np

from kubetune.api import TrainerConfig
from kubetune_trainer.data.dedup import HashSet64, NearDedup, content_hash
from kubetune_trainer.data.encode import Encoder
from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.fingerprint import PREPARED_FORMAT_VERSION, fingerprint, tokenizer_identity
from kubetune_trainer.data.invalid import InvalidTally
from kubetune_trainer.data.mixture import consume, source_records
from kubetune_trainer.data.packing import Packer, spill_columns
from kubetune_trainer.data.records import Example, RecordRules, parse_record
from kubetune_trainer.data.s3 import (
    delete_prefix,
    exists,
    get_required_bytes,
    join_uri,
    list_objects,
    put_bytes,
    s3_client,
)
from kubetune_trainer.data.shards import batch_indices, load_shard, write_shard
from kubetune_trainer.data.spill import RowSpill

__all__ = ["PreparedData", "prepare", "load_shard", "batch_indices", "DataError"]

log = logging.getLogger(__name__)

BATCH_RECORDS = 256  # examples tokenised per tokenizer call: amortises the call, bounds memory
PROGRESS_SECONDS = 30.0
COMPLETE_MARKER = "_COMPLETE"


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


def prepare(cfg: TrainerConfig, tokenizer: Any, num_shards: int, client: Any = None) -> PreparedData:
    """Prepare (or reuse) the job's data; see the module docstring. Raises DataError for unusable data."""
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
    prefix = join_uri(cfg.run_uri, "prepared", fp)
    if exists(client, join_uri(prefix, COMPLETE_MARKER)):
        log.info("reusing prepared data %s", prefix)
        return _from_manifest(json.loads(get_required_bytes(client, join_uri(prefix, "manifest.json"))))
    removed = delete_prefix(client, prefix)
    if removed:
        log.info("removed %d objects of an unfinished preparation under %s", removed, prefix)
    with tempfile.TemporaryDirectory(prefix="kubetune-prepare-") as tmp:
        run = _Run(cfg, tokenizer, tmp)
        run.read_sources(client, per_source)
        for obj in validation_objects:
            run.read_object(client, obj, validation_source=True)
        run.finish()
        return _write_outputs(
            run, cfg, client, prefix, fp, num_shards, tmp, has_validation=bool(ds.validation or ds.validation_split)
        )


def _sources(client: Any, uri: str, what: str) -> list[dict[str, Any]]:
    objs = list_objects(client, uri)
    if not objs:
        raise DataError(f"{what}: no data objects at {uri}")
    return objs


class _Run:
    """The state of one pass over the data: counters, dedup sets, tokenizer batches and the two packers."""

    def __init__(self, cfg: TrainerConfig, tokenizer: Any, tmp: str):
        ds = cfg.spec.dataset
        self.pp = ds.preprocessing
        self.rules = RecordRules.from_spec(ds, cfg.spec.model.num_labels)
        self.sources = ds.train_sources()
        self.source_rules = [RecordRules.from_spec(ds, cfg.spec.model.num_labels, src) for src in self.sources]
        self.source_kept: list[int] = []
        self.classification = ds.format == "classification"
        self.file_format = ds.file_format
        self.validation_split = ds.validation_split
        self.seed = cfg.spec.training.seed
        self.encoder = Encoder(tokenizer, ds.format, self.pp.max_seq_length)
        self.exact = HashSet64() if self.pp.deduplicate else None
        near = self.pp.near_duplicate_threshold
        self.near = NearDedup(near) if near is not None else None
        self.invalid = InvalidTally()
        self.records = 0
        self.duplicates = 0
        self.filtered = 0
        # A preference row holds a pair (prompt + chosen, prompt + rejected), each up to maxSeqLength, never packed.
        preference = ds.format == "preference"
        width = self.pp.max_seq_length * (2 if preference else 1)
        cols = spill_columns(self.classification, width)
        self.packers = {
            split: Packer(
                RowSpill(os.path.join(tmp, split), cols),
                width,
                self.encoder.pad_id,
                self.pp.packing and not preference,
                self.classification,
            )
            for split in ("train", "validation")
        }
        # Valid, length-filtered examples waiting for the batched dedup, then per split for the tokenizer.
        self.incoming: list[tuple[Example, int, bool]] = []
        self.pending: dict[str, list[Example]] = {"train": [], "validation": []}
        self._started = time.monotonic()
        self._last_log = self._started

    def read_object(self, client: Any, obj: dict[str, Any], validation_source: bool) -> None:
        for record in source_records(client, [obj], self.file_format, self.rules.columns()):
            self._take(record, self.rules, validation_source)

    def read_sources(self, client: Any, per_source: list[list[dict[str, Any]]]) -> None:
        """The training sources, interleaved by weight (see mixture.py); one source is simply read through."""
        streams = [
            source_records(client, objs, src.file_format or "auto", rules.columns())
            for objs, src, rules in zip(per_source, self.sources, self.source_rules)
        ]
        self.source_kept, first_out = consume(
            streams, [s.weight for s in self.sources], lambda i, record: self._take(record, self.source_rules[i], False)
        )
        if len(self.sources) > 1:
            log.info(
                "mixture: kept %s examples per source (weights %s); source %s ran out first",
                self.source_kept,
                [s.weight for s in self.sources],
                first_out,
            )

    def _take(self, record: tuple[str, Any, str | None], rules: RecordRules, validation_source: bool) -> bool:
        """Count one raw record and pass it on; whether it was kept (valid and within the length filters)."""
        where, value, reason = record
        self.records += 1
        if time.monotonic() - self._last_log > PROGRESS_SECONDS:
            self._log_progress()
        if reason is not None:
            self.invalid.add(reason, where)
            return False
        assert value is not None
        return self._add(value, where, validation_source, rules)

    def _add(self, value: dict[str, Any], where: str, validation_source: bool, rules: RecordRules) -> bool:
        ex = parse_record(value, rules)
        if isinstance(ex, str):
            self.invalid.add(ex, where)
            return False
        if self.encoder.has_control_token(ex):
            self.invalid.add("control_token", where)
            return False
        if ex.chars < self.pp.min_chars or (self.pp.max_chars is not None and ex.chars > self.pp.max_chars):
            self.filtered += 1
            return False
        self.incoming.append((ex, content_hash(ex.content), validation_source))
        if len(self.incoming) >= BATCH_RECORDS:
            self._dedup_and_route()
        return True

    def _dedup_and_route(self) -> None:
        # Exact dedup runs a batch at a time (vectorised lookups in a compact hash set); the first occurrence
        # in record order is kept, exactly as a one-by-one check would.
        batch, self.incoming = self.incoming, []
        if self.exact is not None:
            dup = self.exact.check_and_add(np.fromiter((h for _, h, _ in batch), np.uint64, len(batch)))
        else:
            dup = np.zeros(len(batch), dtype=bool)
        for (ex, h, validation_source), is_dup in zip(batch, dup):
            if is_dup or (self.near is not None and self.near.is_duplicate(ex.content)):
                self.duplicates += 1
                continue
            split = "validation" if validation_source or self._held_out(h) else "train"
            self.pending[split].append(ex)
            if len(self.pending[split]) >= BATCH_RECORDS:
                self._flush(split)

    def _held_out(self, h: int) -> bool:
        # A pure function of the seed and the content: the same record lands on the same side in every run,
        # whatever the file order or sharding.
        if not self.validation_split:
            return False
        d = hashlib.blake2b(f"{self.seed}:{h}".encode(), digest_size=8).digest()
        return int.from_bytes(d, "little") / 2.0**64 < self.validation_split

    def _flush(self, split: str) -> None:
        batch, self.pending[split] = self.pending[split], []
        packer = self.packers[split]
        for enc in self.encoder.encode(batch):
            if enc is None:
                # Truncation to maxSeqLength left no target tokens (a prompt longer than the limit).
                self.filtered += 1
            else:
                packer.add(enc)

    def finish(self) -> None:
        self._dedup_and_route()
        for split in ("train", "validation"):
            self._flush(split)
            self.packers[split].finish()
        self._log_progress()
        self.invalid.check(self.records, self.pp.max_invalid_fraction)

    def _log_progress(self) -> None:
        self._last_log = time.monotonic()
        rate = self.records / max(self._last_log - self._started, 1e-9)
        log.info(
            "prepare: %d records (%.0f/s), %d invalid, %d duplicates, %d filtered",
            self.records,
            rate,
            self.invalid.total,
            self.duplicates,
            self.filtered,
        )


def _write_outputs(
    run: _Run, cfg: TrainerConfig, client: Any, prefix: str, fp: str, num_shards: int, tmp: str, has_validation: bool
) -> PreparedData:
    train_spill = run.packers["train"].spill
    val_spill = run.packers["validation"].spill
    n = train_spill.rows
    per_shard = n // num_shards
    if per_shard == 0:
        raise DataError(
            f"only {n} training sequences after preprocessing, fewer than the {num_shards} workers that each "
            f"need one (records read: {run.records}, invalid: {run.invalid.total}, duplicates: "
            f"{run.duplicates}, filtered: {run.filtered})"
        )
    # Rows are only as wide as the longest one actually used (small data does not pay for maxSeqLength).
    width = max(run.packers["train"].max_fill, run.packers["validation"].max_fill)

    # Shuffle rows across shards (files are often sorted by source or topic), and drop the remainder at
    # random rather than always the tail. Each shard's rows are read in sorted order for locality.
    perm = np.random.default_rng(np.random.SeedSequence([cfg.spec.training.seed, 7919])).permutation(n)
    train_cols = train_spill.read()
    train_uris, tokens = [], 0
    for r in range(num_shards):
        rows = np.sort(perm[r * per_shard : (r + 1) * per_shard])
        uri = join_uri(prefix, "train", f"part-{r:05d}.parquet")
        tokens += write_shard(train_cols, rows, width, os.path.join(tmp, "shard.parquet"), client, uri)
        train_uris.append(uri)
    del train_cols

    val_uris: list[str] = []
    if has_validation and val_spill.rows == 0:
        # Too little data for the split to hold anything out: say so, and train without evaluation rather
        # than hand the trainer empty evaluation shards.
        log.warning("no validation sequences (validationSplit on %d records held none out)", run.records)
    elif has_validation:
        val_cols = val_spill.read()
        for r, rows in enumerate(np.array_split(np.arange(val_spill.rows), num_shards)):
            uri = join_uri(prefix, "validation", f"part-{r:05d}.parquet")
            write_shard(val_cols, rows, width, os.path.join(tmp, "shard.parquet"), client, uri)
            val_uris.append(uri)
        del val_cols

    stats = {
        "records": run.records,
        "trainRecords": run.packers["train"].examples,
        "validationRecords": run.packers["validation"].examples,
        "duplicatesRemoved": run.duplicates,
        "filtered": run.filtered,
        "invalidRecords": run.invalid.total,
        "invalidByReason": dict(sorted(run.invalid.counts.items())),
        "tokens": tokens,
        "sequences": per_shard * num_shards,
    }
    if len(run.source_kept) > 1:
        stats["sourceRecords"] = run.source_kept
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
        invalid_samples=dict(sorted(run.invalid.samples.items())),
    )
    put_bytes(client, join_uri(prefix, "stats.json"), json.dumps(stats, indent=2).encode(), "application/json")
    manifest = {"formatVersion": PREPARED_FORMAT_VERSION, **asdict(prepared)}
    put_bytes(client, prepared.manifest_uri, json.dumps(manifest, indent=2).encode(), "application/json")
    put_bytes(client, join_uri(prefix, COMPLETE_MARKER), b"", "text/plain")
    log.info(
        "prepared %d train sequences (%d per shard, %d dropped), %d validation, width %d, under %s",
        prepared.num_train_sequences,
        per_shard,
        prepared.dropped_sequences,
        prepared.num_validation_sequences,
        width,
        prefix,
    )
    return prepared


def _from_manifest(manifest: dict[str, Any]) -> PreparedData:
    manifest = dict(manifest)
    manifest.pop("formatVersion", None)
    return PreparedData(**manifest)
