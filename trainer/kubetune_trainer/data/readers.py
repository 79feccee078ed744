"""Streaming raw records out of S3 objects: JSONL line by line (gzip too), Parquet a row-group batch at a time.

Neither reader ever holds a whole file: JSONL goes through a 1 MiB buffered stream, Parquet through ranged GETs
of the footer and one row group's columns. Each record comes with a location (object URI + line or row
number, 1-based) so an invalid one can be pointed at.
"""

from __future__ import annotations

import gzip
import json
from typing import Any, Iterator

import pyarrow.parquet as pq

from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.s3 import RangeFile, open_stream

JSONL_SUFFIXES = (".jsonl", ".json", ".ndjson")
PARQUET_SUFFIXES = (".parquet", ".pq")

# (location, record, reason): record is a dict when reason is None.
RawRecord = tuple[str, "dict[str, Any] | None", "str | None"]


def file_format_of(key: str, configured: str) -> str:
    """jsonl or parquet for one object: the configured fileFormat, or decided by extension under auto."""
    if configured != "auto":
        return configured
    name = key.lower().removesuffix(".gz")
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    raise DataError(
        f"cannot tell the file format of {key!r} from its extension (expected .jsonl, .json, .ndjson "
        "(optionally .gz) or .parquet); set spec.dataset.fileFormat"
    )


def read_records(client: Any, obj: dict, configured_format: str, columns: list[str] | None = None
                 ) -> Iterator[RawRecord]:
    """Every record of one listed object (see s3.list_objects)."""
    fmt = file_format_of(obj["key"], configured_format)
    if fmt == "jsonl":
        yield from _read_jsonl(client, obj)
    else:
        yield from _read_parquet(client, obj, columns)


def _read_jsonl(client: Any, obj: dict) -> Iterator[RawRecord]:
    stream: Any = open_stream(client, obj)
    if obj["key"].lower().endswith(".gz"):
        stream = gzip.GzipFile(fileobj=stream, mode="rb")
    uri = obj["uri"]
    try:
        for lineno, raw in enumerate(stream, start=1):
            where = f"{uri} line {lineno}"
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, None, "bad_encoding"
                continue
            if lineno == 1:
                line = line.lstrip("\ufeff")  # a byte-order mark is an editor's artefact, not data
            line = line.strip()
            if not line:
                continue  # blank lines (often a trailing one) are layout, not records
            try:
                value = json.loads(line)
            except ValueError:
                yield where, None, "bad_json"
                continue
            if not isinstance(value, dict):
                yield where, None, "not_an_object"
                continue
            yield where, value, None
    except (OSError, EOFError) as exc:  # gzip's "not a gzipped file" / truncated stream
        raise DataError(f"cannot read {uri}: {exc}") from None
    finally:
        stream.close()


def _read_parquet(client: Any, obj: dict, columns: list[str] | None) -> Iterator[RawRecord]:
    uri = obj["uri"]
    try:
        pf = pq.ParquetFile(RangeFile(client, obj))
    except Exception as exc:  # pyarrow raises ArrowInvalid, OSError, ... for a non-Parquet body
        raise DataError(f"{uri} is not a readable Parquet file: {exc}") from None
    present = set(pf.schema_arrow.names)
    # Read only the columns the format uses (a column missing from the file surfaces as missing_field).
    wanted = [c for c in columns if c in present] if columns is not None else None
    row = 0
    for batch in pf.iter_batches(batch_size=1024, columns=wanted):
        # A batch of zero columns (none of the format's fields exist) still has rows, each missing everything.
        values = batch.to_pylist() if batch.num_columns else [{} for _ in range(batch.num_rows)]
        for value in values:
            row += 1
            yield f"{uri} row {row}", value, None
