"""Fixed-length training rows from tokenised examples: packed for causal LM, padded one per row otherwise.

Packing is next-fit over whole examples: an example goes into the current row if it fits, otherwise the row is
closed (padded) and a new one begins. Examples are never split across rows, so a response always sits in the
same row as its prompt. Each row carries
- attention_mask: 1 on tokens, 0 on padding;
- position_ids: restarting at 0 for every example, so each example sees the positions it would see alone;
- segment_ids: 1, 2, 3 ... per example in the row, 0 on padding.
The label of each example's first token is masked, so no loss term ever predicts one example from the one
before it. Attention, however, is causal over the whole row with the default (sdpa/eager) attention: a token
can attend to earlier examples in the same row. A trainer that wants isolation builds a block-diagonal mask from
segment_ids, or uses flash-attention-2, which transformers restricts per example from the reset position_ids.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from kubetune_trainer.data.encode import IGNORE, Encoded
from kubetune_trainer.data.spill import RowSpill

CAUSAL_COLUMNS: dict[str, tuple[np.dtype[Any], int | None]] = {
    "input_ids": (np.dtype(np.int32), None),
    "labels": (np.dtype(np.int32), None),
    "attention_mask": (np.dtype(np.int8), None),
    "position_ids": (np.dtype(np.int32), None),
    "segment_ids": (np.dtype(np.int32), None),
}
CLASSIFICATION_COLUMNS: dict[str, tuple[np.dtype[Any], int | None]] = {
    "input_ids": (np.dtype(np.int32), None),
    "attention_mask": (np.dtype(np.int8), None),
    "label": (np.dtype(np.int64), 0),
}


def spill_columns(classification: bool, width: int) -> dict[str, tuple[np.dtype, int]]:
    cols = CLASSIFICATION_COLUMNS if classification else CAUSAL_COLUMNS
    return {name: (dtype, width if w is None else w) for name, (dtype, w) in cols.items()}


class Packer:
    """Turns Encoded examples into rows of `width` tokens and appends them to a RowSpill in blocks."""

    def __init__(
        self, spill: RowSpill, width: int, pad_id: int, pack: bool, classification: bool, block_tokens: int = 1 << 15
    ):
        self.spill = spill
        self.width = width
        self.pad_id = pad_id
        self.pack = pack and not classification
        self.classification = classification
        # Rows are built in a block of about block_tokens tokens (a few MB) and then spilled to disk.
        self.block_rows = max(1, block_tokens // width)
        self.max_fill = 0  # longest used length of any row, so shards can be trimmed to it
        self.examples = 0
        self._block: dict[str, np.ndarray] | None = None  # allocated on first use (validation may stay empty)
        self._row = 0  # next free row in the block
        self._fill = 0  # tokens used in the current row
        self._segments = 0

    def _new_block(self) -> dict[str, np.ndarray]:
        b, w = self.block_rows, self.width
        if self.classification:
            return {
                "input_ids": np.full((b, w), self.pad_id, np.int32),
                "attention_mask": np.zeros((b, w), np.int8),
                "label": np.zeros(b, np.int64),
            }
        return {
            "input_ids": np.full((b, w), self.pad_id, np.int32),
            "labels": np.full((b, w), IGNORE, np.int32),
            "attention_mask": np.zeros((b, w), np.int8),
            "position_ids": np.zeros((b, w), np.int32),
            "segment_ids": np.zeros((b, w), np.int32),
        }

    def add(self, enc: Encoded) -> None:
        n = len(enc.input_ids)
        if n == 0:
            return
        assert n <= self.width
        if self._fill and (not self.pack or self._fill + n > self.width):
            self._close_row()
        if self._block is None:
            self._block = self._new_block()
        r, a, b = self._row, self._fill, self._fill + n
        blk = self._block
        blk["input_ids"][r, a:b] = enc.input_ids
        blk["attention_mask"][r, a:b] = 1
        if self.classification:
            blk["label"][r] = enc.label
        else:
            assert enc.labels is not None
            blk["labels"][r, a:b] = enc.labels
            blk["labels"][r, a] = IGNORE
            # A preference pair is two sequences in one Encoded: the rejected one (from boundary on) gets its
            # own positions and segment, exactly as if it had been packed after the chosen one.
            cut = enc.boundary if enc.boundary is not None else n
            blk["position_ids"][r, a : a + cut] = np.arange(cut, dtype=np.int32)
            self._segments += 1
            blk["segment_ids"][r, a : a + cut] = self._segments
            if cut < n:
                blk["labels"][r, a + cut] = IGNORE
                blk["position_ids"][r, a + cut : b] = np.arange(n - cut, dtype=np.int32)
                self._segments += 1
                blk["segment_ids"][r, a + cut : b] = self._segments
        self._fill = b
        self.examples += 1

    def _close_row(self) -> None:
        self.max_fill = max(self.max_fill, self._fill)
        self._row += 1
        self._fill = 0
        self._segments = 0
        if self._row == self.block_rows:
            assert self._block is not None
            self.spill.append(self._block)
            self._block = None
            self._row = 0

    def finish(self) -> None:
        """Close the last row and flush; the spill is then complete."""
        if self._fill:
            self._close_row()
        if self._row and self._block is not None:
            self.spill.append({k: v[: self._row] for k, v in self._block.items()})
        self._block = None
        self._row = 0
        self.spill.close()
