"""Prepared shards: writing them as Parquet, loading one into arrays, and the deterministic batch order.

A shard holds fixed-width rows: 2-D columns are Parquet fixed-size lists (so loading is a reshape, not a
per-row conversion), 1-D columns (the classification label) plain integers.
"""

from __future__ import annotations

import io
import os
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from kubetune_trainer.data.s3 import get_required_bytes, s3_client, upload_file

# Rows per Parquet row group (and per read of the spilled rows): about 32k tokens, so a group costs about half a
# megabyte whatever the sequence length.
ROW_GROUP_TOKENS = 1 << 15


def _table(columns: dict[str, np.ndarray]) -> pa.Table:
    arrays, names = [], []
    for name, arr in columns.items():
        if arr.ndim == 2:
            flat = pa.array(np.ascontiguousarray(arr).reshape(-1))
            arrays.append(pa.FixedSizeListArray.from_arrays(flat, arr.shape[1]))
        else:
            arrays.append(pa.array(np.asarray(arr)))
        names.append(name)
    return pa.Table.from_arrays(arrays, names=names)


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
        table = pq.read_table(source)
        for name in table.column_names:
            col = table.column(name).combine_chunks()
            if pa.types.is_fixed_size_list(col.type):
                width = col.type.list_size
                arr = col.flatten().to_numpy(zero_copy_only=False).reshape(-1, width)
            else:
                arr = col.to_numpy(zero_copy_only=False)
            parts.setdefault(name, []).append(arr)
    return {name: np.concatenate(arrs) for name, arrs in parts.items()}


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
