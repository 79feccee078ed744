"""The per-record work of a preparation, the same code in one process or in parallel Ray actors.

Two steps, each a pure function of its input (so their results do not depend on where or in which order they
run):
- parse_block: read one block (blocks.py), parse, validate, normalise, check control tokens and the length
  filters of each record; hash what is kept (and sign it for near-dedup), and tell which side of the held-out
  split it falls on (a function of its hash). Returns the small per-record facts the driver needs for the
  global steps (BlockFacts) and, apart, the kept examples themselves in two lists, one per side, so that
  packing either split loads only its own examples.
- encode_unit: render, tokenise, mask and pack a run of consecutive examples (in the global order the driver
  decided) into fixed-width rows.
"""

from __future__ import annotations

import contextlib
import gc
import hashlib
import itertools
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune.api import TrainerConfig
from kubetune_trainer.data.blocks import Block
from kubetune_trainer.data.dedup import content_hash, signature
from kubetune_trainer.data.encode import Encoder
from kubetune_trainer.data.packing import Packer, spill_columns
from kubetune_trainer.data.readers import RawRecord, open_ahead, read_jsonl_range, read_records
from kubetune_trainer.data.records import Example, RecordRules, parse_record
from kubetune_trainer.data.s3 import s3_client

BATCH_RECORDS = 256  # examples tokenised per tokenizer call: amortises the call, bounds memory

# Per-record status in BlockFacts.status.
KEPT, FILTERED, INVALID = 0, 1, 2
# A block's kept examples by side of the held-out split: (train side, held-out side), each in block order.
Sides = tuple[list[Example], list[Example]]


@contextlib.contextmanager
def paused_gc() -> Iterator[None]:
    """No cyclic garbage collection while a block is parsed or a unit encoded.

    Both allocate hundreds of thousands of small containers (parsed JSON, turns, token offsets) that live until
    the block or unit is done; enough of them survive the young generations to trigger full collections, each
    a walk over every object of the process (transformers and the tokenizer: ~300k), about a tenth of the
    pass's time. Neither step makes reference cycles (their objects are freed by reference counting), so the
    pause costs no memory; collection resumes between blocks and units."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


@dataclass(frozen=True)
class Settings:
    """What the per-record steps need from the job spec, resolved once on the driver (picklable)."""

    fmt: str
    endpoint: str | None
    region: str
    validation_rules: RecordRules
    source_rules: tuple[RecordRules, ...]
    min_chars: int
    max_chars: int | None
    near_dedup: bool
    validation_split: float | None  # the held-out fraction of the training sources
    seed: int
    max_seq_length: int
    width: int  # row width: maxSeqLength, twice that for a preference pair
    packing: bool
    classification: bool

    @classmethod
    def from_config(cls, cfg: TrainerConfig) -> Settings:
        ds, pp = cfg.spec.dataset, cfg.spec.dataset.preprocessing
        labels = cfg.spec.model.num_labels
        preference = ds.format == "preference"
        return cls(
            fmt=ds.format,
            endpoint=ds.endpoint,
            region=ds.region,
            validation_rules=RecordRules.from_spec(ds, labels),
            source_rules=tuple(RecordRules.from_spec(ds, labels, src) for src in ds.train_sources()),
            min_chars=pp.min_chars,
            max_chars=pp.max_chars,
            near_dedup=pp.near_duplicate_threshold is not None,
            validation_split=ds.validation_split,
            seed=cfg.spec.training.seed,
            max_seq_length=pp.max_seq_length,
            width=pp.max_seq_length * (2 if preference else 1),
            packing=pp.packing and not preference,  # a preference row holds one pair, never packed
            classification=ds.format == "classification",
        )


@dataclass
class BlockFacts:
    """What the driver needs of one parsed block (the examples themselves travel separately)."""

    index: int
    status: np.ndarray  # uint8 per record read: KEPT, FILTERED or INVALID
    hashes: np.ndarray  # uint64 content hash per kept record
    held: np.ndarray  # bool per kept record: on the held-out side (all of a validation source's records)
    invalid: list[tuple[int, str, str]]  # (record number in the block, reason, location) per invalid record
    lines: int = 0  # lines owned by a ranged JSONL block (its locations count from the range's first line)
    signatures: np.ndarray | None = None  # [kept, NUM_PERM] MinHash values, with near-dedup


@dataclass
class UnitRows:
    """The packed rows of one unit of consecutive examples (blocks stays empty when they went to a sink)."""

    blocks: list[dict[str, np.ndarray]] = field(default_factory=list)
    rows: int = 0
    examples: int = 0
    filtered: int = 0  # truncation left no target tokens
    max_fill: int = 0


class _UnitSink:
    """Where the packer puts one unit's packed blocks (a RowSpill stand-in): kept in memory (a unit is a few
    thousand examples), or passed on to a spill that stays open for the next unit; this unit's rows are counted
    either way."""

    def __init__(self, spill: Any = None):
        self.spill = spill
        self.blocks: list[dict[str, np.ndarray]] = []
        self.rows = 0

    def append(self, batch: dict[str, np.ndarray]) -> None:
        if self.spill is None:
            self.blocks.append({k: np.ascontiguousarray(v) for k, v in batch.items()})
        else:
            self.spill.append(batch)
        self.rows += len(next(iter(batch.values())))

    def close(self) -> None:
        pass  # a spill is closed by its owner, after the last unit


class Worker:
    """One process's state: the settings, the tokenizer's Encoder and an S3 client."""

    def __init__(self, settings: Settings, tokenizer: Any, client: Any = None):
        self.settings = settings
        self.encoder = Encoder(tokenizer, settings.fmt, settings.max_seq_length)
        self.client = client or s3_client(settings.endpoint, settings.region)

    def records(self, block: Block, rules: RecordRules, opened: Any = None) -> tuple[Any, Any]:
        if block.ranged:
            assert block.start is not None and block.end is not None
            return read_jsonl_range(self.client, block.obj, block.start, block.end, opened)
        return read_records(self.client, block.obj, block.file_format, rules.columns(), opened), lambda: 0

    def open_ahead(self, block: Block) -> Any:
        """The block's stream, opened before parse_block needs it (readers.open_ahead)."""
        return open_ahead(self.client, block.obj, block.file_format, block.start, block.end)

    def parse_block(self, block: Block, opened: Any = None) -> tuple[BlockFacts, Sides]:
        """opened: the block's stream from open_ahead, if any (parse_block reads and closes it)."""
        with paused_gc():
            return self._parse_block(block, opened)

    def _parse_block(self, block: Block, opened: Any) -> tuple[BlockFacts, Sides]:
        s = self.settings
        rules = s.validation_rules if block.source < 0 else s.source_rules[block.source]
        records, lines = self.records(block, rules, opened)
        status: list[int] = []
        hashes: list[int] = []
        invalid: list[tuple[int, str, str]] = []
        examples: list[Example] = []
        for record in records:
            code = self._check(record, rules, examples, invalid, len(status))
            if code == KEPT:
                try:
                    hashes.append(content_hash(examples[-1].content))
                except UnicodeEncodeError:
                    # A lone surrogate escape ("\ud800") parses into a str that no UTF-8 can carry: neither the
                    # hash nor the tokenizer could take it.
                    examples.pop()
                    invalid.append((len(status), "bad_encoding", record[0]))
                    code = INVALID
            status.append(code)
        sigs = np.stack([signature(ex.content) for ex in examples]) if s.near_dedup and examples else None
        held = [block.source < 0 or held_out(h, s.seed, s.validation_split) for h in hashes]
        facts = BlockFacts(
            block.index,
            np.asarray(status, dtype=np.uint8),
            np.asarray(hashes, dtype=np.uint64),
            np.asarray(held, dtype=bool),
            invalid,
            lines(),
            sigs,
        )
        sides: Sides = ([], [])
        for ex, h in zip(examples, held):
            sides[h].append(ex)
        return facts, sides

    def _check(
        self, record: RawRecord, rules: RecordRules, examples: list[Example], invalid: list[Any], number: int
    ) -> int:
        where, value, reason = record
        if reason is None:
            assert value is not None
            ex = parse_record(value, rules)
            if isinstance(ex, str):
                reason = ex
            elif self.encoder.has_control_token(ex):
                reason = "control_token"
            else:
                s = self.settings
                if ex.chars < s.min_chars or (s.max_chars is not None and ex.chars > s.max_chars):
                    return FILTERED
                examples.append(ex)
                return KEPT
        invalid.append((number, reason, where))
        return INVALID

    def encode_unit(self, examples: Iterable[Example], sink: Any = None) -> UnitRows:
        """Encode and pack the examples (consumed BATCH_RECORDS at a time). The rows go to `sink` (an open
        RowSpill, left open) or, without one, into the returned UnitRows."""
        with paused_gc():
            return self._encode_unit(examples, sink)

    def _encode_unit(self, examples: Iterable[Example], sink: Any) -> UnitRows:
        s = self.settings
        target = _UnitSink(sink)
        packer = Packer(target, s.width, self.encoder.pad_id, s.packing, s.classification)  # type: ignore[arg-type]
        out = UnitRows()
        it = iter(examples)
        batches = iter(lambda: list(itertools.islice(it, BATCH_RECORDS)), [])
        for encoded in self.encoder.encode_batches(batches):
            for enc in encoded:
                if enc is None:
                    out.filtered += 1  # truncation to maxSeqLength left no target tokens (a long prompt)
                else:
                    packer.add(enc)
        packer.finish()
        out.blocks, out.rows = target.blocks, target.rows
        out.examples, out.max_fill = packer.examples, packer.max_fill
        return out


def held_out(content_hash: int, seed: int, validation_split: float | None) -> bool:
    """Whether a training source's record goes to the held-out split (if it is kept): a pure function of the
    seed and the content, so the same record lands on the same side in every run, whatever the file order,
    the sharding or the process that parsed it."""
    if not validation_split:
        return False
    d = hashlib.blake2b(f"{seed}:{content_hash}".encode(), digest_size=8).digest()
    return int.from_bytes(d, "little") / 2.0**64 < validation_split


def side_positions(held: np.ndarray) -> np.ndarray:
    """Each kept record's place in its side's list (Sides), from the block's held flags."""
    return np.where(held, np.cumsum(held) - 1, np.cumsum(~held) - 1)


def row_columns(settings: Settings) -> dict[str, tuple[np.dtype, int]]:
    return spill_columns(settings.classification, settings.width)
