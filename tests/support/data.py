"""Helpers for the trainer data tests: JSONL and Parquet bytes, and reading prepared arrays back as examples."""

from __future__ import annotations

import gzip
import io
import json
from typing import Any

import numpy as np

from tests.support.s3 import BUCKET  # noqa: F401 - re-exported: the data tests import it from here


def jsonl_bytes(records: list[Any], gz: bool = False) -> bytes:
    """One line per item: str and bytes items are written verbatim (for bad lines), anything else as JSON."""
    lines = []
    for r in records:
        if isinstance(r, bytes):
            lines.append(r)
        elif isinstance(r, str):
            lines.append(r.encode("utf-8"))
        else:
            lines.append(json.dumps(r).encode("utf-8"))
    data = b"".join(line + b"\n" for line in lines)
    return gzip.compress(data, mtime=0) if gz else data


def parquet_bytes(records: list[dict[str, Any]], row_group_size: int | None = None) -> bytes:
    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf, row_group_size=row_group_size)
    return buf.getvalue()


def examples_of(arrays: dict[str, np.ndarray]) -> list[tuple[np.ndarray, np.ndarray]]:
    """Unpack packed rows into (input_ids, labels) per example, using segment_ids."""
    out = []
    for ids, labels, seg in zip(arrays["input_ids"], arrays["labels"], arrays["segment_ids"]):
        for s in range(1, int(seg.max()) + 1):
            m = seg == s
            out.append((ids[m], labels[m]))
    return out


def targets_text(tokenizer: Any, ids: np.ndarray, labels: np.ndarray) -> str:
    """The text of the tokens that carry loss."""
    return tokenizer.decode([int(t) for t, label in zip(ids, labels) if label != -100])
