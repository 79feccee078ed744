"""Streaming raw records out of S3 objects: JSONL line by line and JSON arrays element by element (gzip too),
Parquet a row-group batch at a time.

No reader ever holds a whole file: JSONL and JSON arrays go through a buffered stream, Parquet through ranged
GETs of the footer and one row group's columns. Each record comes with a location (object URI + line, element
or row number, 1-based) so an invalid one can be pointed at.

Under fileFormat auto the extension decides Parquet; a text file's first bytes decide between JSONL (`{`) and
a JSON array (`[`, for .json files), and a file that is neither is refused with what it starts with (an HTML
error page saved as data, a CSV, a zip) instead of being counted as 100% invalid lines.
"""

from __future__ import annotations

import gzip
import json
from collections.abc import Iterable, Iterator
from typing import IO, Any

import orjson
import pyarrow.parquet as pq

from kubetune_trainer.data.errors import DataError
from kubetune_trainer.data.json_array import iter_json_array
from kubetune_trainer.data.s3 import RangeFile, open_stream

JSONL_SUFFIXES = (".jsonl", ".ndjson")
JSON_SUFFIXES = (".json",)  # a JSON array or JSONL: the first character decides
PARQUET_SUFFIXES = (".parquet", ".pq")
SNIFF_BYTES = 4096

# (location, record, reason): record is a dict when reason is None.
RawRecord = tuple[str, "dict[str, Any] | None", "str | None"]


def file_format_of(key: str, configured: str) -> str:
    """parquet, jsonl, json or text (a JSON flavour the first bytes decide) for one object."""
    if configured != "auto":
        return configured
    name = key.lower().removesuffix(".gz")
    if name.endswith(PARQUET_SUFFIXES):
        return "parquet"
    if name.endswith(JSONL_SUFFIXES):
        return "jsonl"
    return "text"  # .json and unknown extensions: decided by the content (sniff)


def read_records(
    client: Any, obj: dict[str, Any], configured_format: str, columns: list[str] | None = None, opened: Any = None
) -> Iterator[RawRecord]:
    """Every record of one listed object (see s3.list_objects); `opened`: its stream from open_ahead, if any."""
    fmt = file_format_of(obj["key"], configured_format)
    if fmt == "parquet":
        yield from _read_parquet(client, obj, columns)
        return
    stream: Any = opened or open_stream(client, obj)
    try:
        if obj["key"].lower().endswith(".gz"):
            stream = gzip.GzipFile(fileobj=stream, mode="rb")
        yield from _read_text(client, obj, stream, fmt, columns, unpacked=False)
    finally:
        stream.close()


def _read_text(
    client: Any, obj: dict[str, Any], stream: Any, fmt: str, columns: list[str] | None, unpacked: bool
) -> Iterator[RawRecord]:
    try:
        head = stream.peek(SNIFF_BYTES)[:SNIFF_BYTES]
    except (OSError, EOFError) as exc:  # gzip's "not a gzipped file"
        raise DataError(f"cannot read {obj['uri']}: {exc}") from None
    kind = sniff(head, fmt, obj["uri"])
    if kind == "parquet":  # Parquet under another name: read it as what it is
        yield from _read_parquet(client, obj, columns)
    elif kind == "gzip" and not unpacked:  # gzip without .gz
        yield from _read_text(client, obj, gzip.GzipFile(fileobj=stream, mode="rb"), fmt, columns, True)
    elif kind == "json":
        yield from _read_json_array(stream, obj["uri"])
    elif kind == "jsonl":
        yield from _read_jsonl(stream, obj["uri"])
    else:
        raise DataError(f"{obj['uri']} starts with {describe(head)} — not JSONL, a JSON array or Parquet")


def sniff(head: bytes, fmt: str, uri: str) -> str:
    """What a text object holds, from its first bytes and the file format (jsonl, json or text = either):
    jsonl, json (an array), parquet or gzip. DataError naming what was found when it is none of them."""
    if head.startswith(b"PAR1"):
        return "parquet"
    if head.startswith(b"\x1f\x8b"):
        return "gzip"
    first = _first_char(head)
    if fmt == "json" or (fmt == "text" and first == "["):
        return "json"  # a configured JSON array that is not one is named by the array parser
    if first in ("{", "[", ""):
        return "jsonl"  # an empty file has no records; "[" on a .jsonl line is a not_an_object record
    try:
        # A first line that is valid JSON (a string, a number) makes the file JSONL with a non-object record.
        json.loads(head.split(b"\n", 1)[0].decode("utf-8").lstrip("\ufeff"))
        return "jsonl"
    except ValueError:
        pass
    hint = "; set spec.dataset.fileFormat if the extension misleads" if fmt == "text" else ""
    raise DataError(f"{uri} starts with {describe(head)} — not JSONL, a JSON array or Parquet{hint}")


def describe(head: bytes) -> str:
    """A short, printable description of a file's first bytes (e.g. '<html><head>' or a zip archive)."""
    if head.startswith(b"PK\x03\x04"):
        return "a zip archive's signature (PK)"
    text = head[:24].decode("utf-8", errors="replace").lstrip("\ufeff").lstrip()
    return repr(text[:12]) if text else "nothing but whitespace"


def _first_char(head: bytes) -> str:
    text = head.decode("utf-8", errors="replace").lstrip("\ufeff \t\r\n")
    return text[:1]


def _read_json_array(stream: IO[bytes], uri: str) -> Iterator[RawRecord]:
    try:
        for number, value in iter_json_array(stream, uri):
            where = f"{uri} element {number}"
            if isinstance(value, dict):
                yield where, value, None
            else:
                yield where, None, "not_an_object"
    except (OSError, EOFError) as exc:  # truncated gzip
        raise DataError(f"cannot read {uri}: {exc}") from None


def _read_jsonl(stream: IO[bytes], uri: str) -> Iterator[RawRecord]:
    return _jsonl_records(stream, uri, strip_bom=True)


def _jsonl_records(lines: Iterable[bytes], uri: str, strip_bom: bool) -> Iterator[RawRecord]:
    """The records of JSONL lines, numbered from 1 (from the object's start when strip_bom, i.e. the first
    line is the object's first line; otherwise from the first line of a byte range, see read_jsonl_range)."""
    try:
        for lineno, raw in enumerate(lines, start=1):
            where = f"{uri} line {lineno}"
            value = _parsed_fast(raw)
            if value is not _UNPARSED:
                if isinstance(value, dict):
                    yield where, value, None
                else:
                    yield where, None, "not_an_object"
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError:
                yield where, None, "bad_encoding"
                continue
            if lineno == 1 and strip_bom:
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


_UNPARSED = object()


def _parsed_fast(raw: bytes) -> Any:
    """A JSONL line parsed by orjson (about twice as fast as json on records), or _UNPARSED when the line takes
    the json path below, which decides what counts as bad JSON: whatever orjson refuses (blank lines, a
    byte-order mark, NaN, Infinity, integers beyond 64 bits, invalid UTF-8, lone surrogates...).

    Where both accept a line they give the same values but one: an integer beyond 64 bits is a float from
    orjson and an int from json. The only number any record format reads is a top-level field (the
    classification label), so a record with a top-level float is parsed again by json."""
    try:
        value = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return _UNPARSED
    if isinstance(value, dict) and float in map(type, value.values()):
        return _UNPARSED
    return value


def read_jsonl_range(
    client: Any, obj: dict[str, Any], start: int, end: int, opened: Any = None
) -> tuple[Iterator[RawRecord], Any]:
    """The records of the JSONL lines that START in bytes [start, end) of an uncompressed object, with line
    numbers counted from the range's first line, and a callable giving the number of lines read (valid once
    the iterator is exhausted). Ranges that tile an object read every line exactly once. `opened`: the range's
    stream from open_ahead, if any."""
    counter = [0]

    def lines() -> Iterator[bytes]:
        stream = opened or _open_range(client, obj, start, end)
        try:
            pos = max(start - 1, 0)
            if start > 0:
                # The rest of the line that began before `start` (just "\n" when a line starts at `start`).
                pos += len(stream.readline())
            while pos < end:
                raw = stream.readline()
                if not raw:
                    break
                pos += len(raw)
                counter[0] += 1
                yield raw
        finally:
            stream.close()

    return _jsonl_records(lines(), obj["uri"], strip_bom=start == 0), lambda: counter[0]


def _open_range(client: Any, obj: dict[str, Any], start: int, end: int) -> Any:
    # From the byte before the range: whether a line starts at `start` shows in it.
    return open_stream(client, obj, start=max(start - 1, 0), stop=end)


def open_ahead(client: Any, obj: dict[str, Any], configured_format: str, start: int | None, end: int | None) -> Any:
    """The stream read_records (whole object: start None) or read_jsonl_range would open for this object or
    range, opened now: its GET sent and answered, so that a reader that opens the next one while it parses this
    one does not wait for the server's first byte (tens of ms per GET, per block). None for Parquet, which
    reads by ranges of its own. The caller hands it to the reader, or closes it."""
    if start is not None and end is not None:
        return _open_range(client, obj, start, end)
    if file_format_of(obj["key"], configured_format) == "parquet":
        return None
    return open_stream(client, obj)


def _read_parquet(client: Any, obj: dict[str, Any], columns: list[str] | None) -> Iterator[RawRecord]:
    uri = obj["uri"]
    try:
        pf = pq.ParquetFile(RangeFile(client, obj))
    except Exception as exc:  # noqa: BLE001 - pyarrow raises ArrowInvalid, OSError, ... for a non-Parquet body
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
