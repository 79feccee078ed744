"""The global, sequential part of a preparation, on the driver: which parsed records are read (the mixture),
which are duplicates, and which side of the split each lands on, in one deterministic order.

It sees only the per-record facts of the parsed blocks (status codes, 64-bit content hashes, the side of the
held-out split each would land on, MinHash signatures with near-dedup, the invalid records' locations), never the
records themselves: a few bytes per record. The order is the one reading the sources one record at a time would
give: the training sources interleaved by weight (mixture.py), then the validation data. Dedup keeps the first
occurrence in that order, so the result does not depend on how many processes parsed the blocks or in which order
they finished.
"""

from __future__ import annotations

import array
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from kubetune_trainer.data.blocks import Block
from kubetune_trainer.data.dedup import HashSet64, NearDedup
from kubetune_trainer.data.invalid import InvalidTally
from kubetune_trainer.data.mixture import consume
from kubetune_trainer.data.worker import FILTERED, KEPT, BlockFacts, side_positions

# Selected records' places, one row each: (block index, side, its place in that side's list: worker.Sides),
# int32, so the driver spends 12 bytes per selected record.
_NO_PICKS = np.zeros((0, 3), dtype=np.int32)


@dataclass
class Selection:
    train: np.ndarray = field(default_factory=lambda: _NO_PICKS)
    validation: np.ndarray = field(default_factory=lambda: _NO_PICKS)
    records: int = 0
    filtered: int = 0
    duplicates: int = 0
    invalid: InvalidTally = field(default_factory=InvalidTally)
    source_kept: list[int] = field(default_factory=list)
    first_out: int | None = None


def select(
    blocks: list[Block],
    facts: list[BlockFacts],
    weights: list[float],
    exact_dedup: bool,
    near_threshold: float | None,
) -> Selection:
    sel = Selection()
    sources: list[list[int]] = [[] for _ in weights]
    validation: list[int] = []
    for b in blocks:
        (validation if b.source < 0 else sources[b.source]).append(b.index)
    offsets = _line_offsets(blocks, facts)
    kept_blocks, kept_numbers = array.array("i"), array.array("i")
    streams = [_stream(facts, ids) for ids in sources]

    def accept(_source: int, rec: tuple[int, int, int]) -> bool:
        block, number, kept_number = rec
        _count(sel, facts[block], number, offsets[block])
        if facts[block].status[number] == KEPT:
            kept_blocks.append(block)
            kept_numbers.append(kept_number)
            return True
        return False

    sel.source_kept, sel.first_out = consume(streams, weights, accept)
    n_train = len(kept_blocks)
    for block in validation:
        for number, kept_number in _numbered(facts[block]):
            accept(-1, (block, number, kept_number))
    kept = np.stack([np.frombuffer(kept_blocks, np.int32), np.frombuffer(kept_numbers, np.int32)], axis=1)
    _dedup_and_split(sel, kept, n_train, facts, exact_dedup, near_threshold)
    return sel


def _numbered(f: BlockFacts) -> list[tuple[int, int]]:
    """(record number, kept number or -1) for each record of a block."""
    is_kept = f.status == KEPT
    kept_numbers = np.where(is_kept, np.cumsum(is_kept) - 1, -1)
    return list(zip(range(len(f.status)), kept_numbers.tolist()))


def _stream(facts: list[BlockFacts], ids: list[int]) -> Any:
    for block in ids:
        for number, kept_number in _numbered(facts[block]):
            yield block, number, kept_number


def _line_offsets(blocks: list[Block], facts: list[BlockFacts]) -> list[int]:
    """Per block, the lines of its object before it (ranged JSONL blocks count their lines from 1)."""
    out, before, last = [], 0, None
    for b in blocks:
        if b.obj["uri"] != last:
            before, last = 0, b.obj["uri"]
        out.append(before)
        before += facts[b.index].lines
    return out


def _count(sel: Selection, f: BlockFacts, number: int, line_offset: int) -> None:
    sel.records += 1
    code = f.status[number]
    if code == FILTERED:
        sel.filtered += 1
    elif code != KEPT:
        _, reason, where = _invalid_at(f, number)
        if line_offset:
            uri, _, line = where.rpartition(" line ")
            where = f"{uri} line {int(line) + line_offset}"
        sel.invalid.add(reason, where)


def _invalid_at(f: BlockFacts, number: int) -> tuple[int, str, str]:
    # Invalid entries are in record order: a binary search finds this record's.
    lo, hi = 0, len(f.invalid)
    while lo < hi:
        mid = (lo + hi) // 2
        if f.invalid[mid][0] < number:
            lo = mid + 1
        else:
            hi = mid
    return f.invalid[lo]


def _dedup_and_split(
    sel: Selection,
    kept: np.ndarray,
    n_train: int,
    facts: list[BlockFacts],
    exact_dedup: bool,
    near_threshold: float | None,
) -> None:
    starts = np.cumsum([0] + [len(f.hashes) for f in facts])
    at = starts[kept[:, 0]] + kept[:, 1]  # each kept record's place among all blocks' kept records
    hashes = np.concatenate([f.hashes for f in facts] + [np.zeros(0, np.uint64)])[at]
    held = np.concatenate([f.held for f in facts] + [np.zeros(0, bool)])[at]
    positions = np.concatenate([side_positions(f.held) for f in facts] + [np.zeros(0, np.int64)])[at]
    # One vectorised pass over the hashes in the global order: the first occurrence is kept.
    dup = HashSet64().check_and_add(hashes) if exact_dedup and len(hashes) else np.zeros(len(kept), dtype=bool)
    near = NearDedup(near_threshold) if near_threshold is not None else None
    side = np.zeros(len(kept), dtype=np.int8)  # 0 dropped, 1 train, 2 validation
    for i in range(len(kept)):
        sig = facts[kept[i, 0]].signatures
        if dup[i] or (near is not None and sig is not None and near.is_duplicate_signature(sig[kept[i, 1]])):
            sel.duplicates += 1
            continue
        # The held-out side of a training source's record was decided when it was parsed (worker.held_out).
        side[i] = 2 if i >= n_train or held[i] else 1
    picks = np.stack([kept[:, 0], held, positions], axis=1).astype(np.int32)
    sel.train, sel.validation = picks[side == 1], picks[side == 2]
