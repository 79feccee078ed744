"""Prepared shards: writing them as Parquet, reading them into arrays (whole, or streamed into local memory maps),
and the deterministic batch order.

A shard holds fixed-width rows: 2-D columns are Parquet fixed-size lists (so loading is a reshape, not a
per-row conversion), 1-D columns (the classification label) plain integers.
"""

from __future__ import annotations

import io
import os
import tempfile
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubetune_trainer.data.s3 import get_required_bytes, parse_uri, retrying, s3_client, upload_file
from kubetune_trainer.data.spill import RowSpill

# Rows per Parquet row group (and per read of the spilled rows): about 32k tokens, so a group costs about half a
# megabyte whatever the sequence length.
ROW_GROUP_TOKENS = 1 << 15


def _table(columns: dict[str, np.ndarray]) -> pa.Table:
    arrays, names = [], []
    for name, arr in columns.items():
        if arr.ndim == 2:
            arrays.append(pa.FixedSizeListArray.from_arrays(_arrow(arr.reshape(-1)), arr.shape[1]))
        else:
            arrays.append(_arrow(arr))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


def _arrow(arr: np.ndarray) -> pa.Array:
    """A 1-D numpy array of numbers as an Arrow array over the same buffer. pa.array() gives the same array but
    imports pandas the first time (its array-like check), a third of a second of a small preparation."""
    arr = np.ascontiguousarray(arr)
    if arr.dtype.kind not in "iuf":  # Arrow packs booleans into bits: numpy's bytes are not its buffer
        return pa.array(arr)
    return pa.Array.from_buffers(pa.from_numpy_dtype(arr.dtype), len(arr), [None, pa.py_buffer(arr)])


def write_shard(
    columns: dict[str, np.ndarray], rows: np.ndarray, width: int, local_path: str, client: Any, uri: str
) -> int:
    """Write the given rows (indices into the spilled columns) trimmed to `width` as one Parquet file, upload
    it, and return the number of tokens in it (attention_mask ones)."""
    tokens = 0

    def gather(idx: np.ndarray) -> dict[str, np.ndarray]:
        # One copy per column: the rows and the trimmed width in a single indexing step.
        return {k: (v[idx, :width] if v.ndim == 2 else v[idx]) for k, v in columns.items()}

    schema = _table(gather(rows[:0])).schema
    with pq.ParquetWriter(local_path, schema, compression="zstd") as writer:
        # Row-group by row-group, so memory stays at one group however large the shard is.
        step = max(1, ROW_GROUP_TOKENS // max(width, 1))
        for start in range(0, len(rows), step):
            idx = rows[start : start + step]
            block = gather(idx)
            tokens += int(block["attention_mask"].sum())
            writer.write_table(_table(block))
    upload_file(client, local_path, uri)
    os.remove(local_path)
    return tokens


def train_shard_rows(num_rows: int, num_shards: int, seed: int) -> list[np.ndarray]:
    """Which rows go into each training shard: the same number in each, shuffled across shards (files are
    often sorted by source or topic), the remainder dropped at random rather than always the tail; each shard's
    rows in ascending order, so a shard reads its rows front to back. A pure function of its arguments: the
    driver decides the plan from the row count alone, wherever the rows themselves are."""
    per_shard = num_rows // num_shards
    perm = np.random.default_rng(np.random.SeedSequence([seed, 7919])).permutation(num_rows)
    return [np.sort(perm[r * per_shard : (r + 1) * per_shard]) for r in range(num_shards)]


def validation_shard_rows(num_rows: int, num_shards: int) -> list[np.ndarray]:
    """Which rows go into each held-out shard: consecutive runs whose sizes differ by at most one row."""
    return list(np.array_split(np.arange(num_rows), num_shards))


def shard_of_row(num_rows: int, shards: list[np.ndarray]) -> np.ndarray:
    """The shard each row goes to (-1: dropped), the inverse of a plan above, as one int32 per row: what an
    actor holding some of the rows needs to cut them into the shards."""
    owner = np.full(num_rows, -1, dtype=np.int32)
    for r, rows in enumerate(shards):
        owner[rows] = r
    return owner


def load_shard(uri_list: list[str], client: Any = None) -> dict[str, np.ndarray]:
    """Read prepared shards (s3:// URIs, or local paths) into arrays: input_ids, attention_mask and, for causal
    LM, labels, position_ids, segment_ids as 2-D [rows, seq_length] arrays; for classification a 1-D label.

    Without a client, one is made from the environment (AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL, AWS_REGION).
    """
    if client is None and any(u.startswith("s3://") for u in uri_list):
        client = s3_client(None, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    parts: dict[str, list[np.ndarray]] = {}
    for uri in uri_list:
        source: Any = io.BytesIO(get_required_bytes(client, uri)) if uri.startswith("s3://") else uri
        for name, arr in _arrays(pq.read_table(source)).items():
            parts.setdefault(name, []).append(arr)
    return {name: np.concatenate(arrs) for name, arrs in parts.items()}


def open_shard(uri_list: list[str], client: Any = None, directory: str | None = None) -> dict[str, np.ndarray]:
    """The rows of prepared shards as read-only memory maps, streamed: each Parquet file is downloaded to local
    disk, decoded a row group at a time into one flat file per column, and mapped. Memory holds one row group
    (about half a MB) at a time; a batch later reads only its own rows' pages. Same arrays as load_shard.

    The files live in a temporary folder under `directory` (node-local scratch; the system's temp folder when
    None) that is removed before returning: the maps stay valid (an unlinked file lives on while mapped) and
    the disk space is freed with the arrays.
    """
    if client is None and any(u.startswith("s3://") for u in uri_list):
        client = s3_client(None, os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1")
    with tempfile.TemporaryDirectory(prefix="kubetune-shard-", dir=directory) as tmp:
        spill: RowSpill | None = None
        empty: dict[str, np.ndarray] = {}
        for i, uri in enumerate(uri_list):
            path = uri
            if uri.startswith("s3://"):
                bucket, key = parse_uri(uri)
                path = os.path.join(tmp, f"part-{i}.parquet")
                retrying(f"downloading {uri}", lambda: client.download_file(bucket, key, path))  # noqa: B023
            pf = pq.ParquetFile(path)
            empty = empty or _arrays(pf.schema_arrow.empty_table())
            for g in range(pf.num_row_groups):
                block = _arrays(pf.read_row_group(g))
                if spill is None:
                    spill = RowSpill(os.path.join(tmp, "rows"), {k: (v.dtype, _width(v)) for k, v in block.items()})
                spill.append(block)
            if path != uri:
                os.remove(path)
        if spill is None:
            return empty  # shards without rows (a validation set smaller than the number of shards)
        spill.close()
        return spill.read()


def _width(arr: np.ndarray) -> int:
    return int(arr.shape[1]) if arr.ndim == 2 else 0


def _arrays(table: pa.Table) -> dict[str, np.ndarray]:
    out = {}
    for name in table.column_names:
        col = table.column(name).combine_chunks()
        if pa.types.is_fixed_size_list(col.type):
            out[name] = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, col.type.list_size)
        else:
            out[name] = col.to_numpy(zero_copy_only=False)
    return out


def batch_indices(num_rows: int, batch_size: int, epoch: int, seed: int) -> list[np.ndarray]:
    """The row indices of each batch of one epoch: a fresh permutation per (seed, epoch), the last incomplete
    batch dropped (every worker's shard has the same rows, so every worker takes the same number of steps).

    Pure function of its arguments: resuming at batch k of an epoch is batch_indices(...)[k:].
    """
    if batch_size < 1:
        raise ValueError("batch_size must be at least 1")
    rng = np.random.default_rng(np.random.SeedSequence([seed, epoch]))
    perm = rng.permutation(num_rows)
    return [perm[i * batch_size : (i + 1) * batch_size] for i in range(num_rows // batch_size)]
