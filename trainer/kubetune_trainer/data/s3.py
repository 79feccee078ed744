"""S3 access for the data side: listing data files, streaming and ranged reads (on top of kubetune.s3).

The client, URIs and small reads/writes are the core's `kubetune.s3` (one contract for every component: a
missing key reads as None); here they keep their data-side names, with URI errors raised as DataError.

Credentials are never passed around in code or config: boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN) from the environment, where the pod mounts the job's credentialsSecret. Nothing here logs
a request, a header or an exception's full repr, so a key can never reach a log line through this module.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import time
from collections.abc import Callable
from typing import Any, TypeVar

from botocore.exceptions import ClientError

from kubetune import s3
from kubetune_trainer.data.errors import DataError

log = logging.getLogger(__name__)
T = TypeVar("T")

# Errors that can break a long streaming GET half-way; boto3's retries only cover the request, not the body.
_STREAM_ERRORS: tuple[type[BaseException], ...]
try:
    from botocore.exceptions import (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
    )
    from urllib3.exceptions import ProtocolError

    _STREAM_ERRORS = (
        ConnectionClosedError,
        IncompleteReadError,
        ReadTimeoutError,
        ResponseStreamingError,
        ProtocolError,
        ConnectionError,
    )
except ImportError:  # older botocore: fall back to what every version has
    _STREAM_ERRORS = (ConnectionError,)

_STREAM_RETRIES = 5


# An S3 server that is away (restarting, a network blip) for this long is waited for, not failed on.
OUTAGE_BUDGET_S = float(os.environ.get("KUBETUNE_S3_OUTAGE_S", "120"))


def _transient(exc: BaseException) -> bool:
    """Connection-level failures and server-side 5xx/throttling: worth another try after a pause."""
    from botocore.exceptions import ConnectTimeoutError, EndpointConnectionError

    if isinstance(exc, ClientError):
        return _status(exc) >= 500 or _code(exc) in ("SlowDown", "RequestTimeout", "ServiceUnavailable")
    return isinstance(exc, (EndpointConnectionError, ConnectTimeoutError, *_STREAM_ERRORS))


def retrying(what: str, fn: Callable[[], T], budget_s: float | None = None) -> T:
    """fn(), tried again with exponential backoff (0.5 s doubling to 8 s) while the S3 server is unreachable,
    for up to `budget_s` (OUTAGE_BUDGET_S). boto3's own retries cover a request; this covers an outage longer
    than they last (a restarting server), so a checkpoint upload or a shard read waits instead of failing."""
    deadline = time.monotonic() + (OUTAGE_BUDGET_S if budget_s is None else budget_s)
    pause = 0.5
    while True:
        try:
            return fn()
        except Exception as exc:  # re-raised unless transient
            if not _transient(exc) or time.monotonic() + pause > deadline:
                raise
            log.warning("S3 %s: %s; trying again in %.1f s", what, type(exc).__name__, pause)
            time.sleep(pause)
            pause = min(pause * 2, 8.0)


def s3_client(endpoint: str | None, region: str) -> Any:
    """A boto3 S3 client for the job's endpoint (kubetune.s3.make_client: path-style, standard retries)."""
    return s3.make_client(endpoint, region=region)


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key"); the key is "" for a bare bucket."""
    try:
        return s3.parse_uri(uri)
    except s3.S3UriError as exc:
        raise DataError(str(exc)) from None


join_uri = s3.join_uri


def _is_hidden(key: str) -> bool:
    # Markers and side files that writers leave next to data (_SUCCESS, _COMPLETE, .crc, .DS_Store) are not data.
    name = key.rsplit("/", 1)[-1]
    return name.startswith("_") or name.startswith(".")


def list_objects(client: Any, uri: str, page_size: int = 1000) -> list[dict[str, Any]]:
    """The object the URI names, or every object under it as a folder, sorted by key.

    Each entry: {"uri", "bucket", "key", "size", "etag"}. A URI that names an existing object is that object
    alone; otherwise it is a folder prefix (a trailing "/" is implied, so s3://b/data does not pick up
    s3://b/data-old.jsonl). Folder markers (keys ending in "/") and hidden files (_*, .*) are skipped.
    """
    bucket, key = parse_uri(uri)
    if key and not key.endswith("/"):
        try:
            head = retrying(f"reading {uri}", lambda: client.head_object(Bucket=bucket, Key=key))
            return [_entry(bucket, key, head["ContentLength"], head.get("ETag", ""))]
        except ClientError as exc:
            if _status(exc) not in (404, 403):
                raise
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    paginator = client.get_paginator("list_objects_v2")
    try:
        pages = retrying(
            f"listing {uri}",
            lambda: list(paginator.paginate(Bucket=bucket, Prefix=prefix, PaginationConfig={"PageSize": page_size})),
        )
        for page in pages:
            for obj in page.get("Contents", []):
                k = obj["Key"]
                if k.endswith("/") or _is_hidden(k):
                    continue
                out.append(_entry(bucket, k, obj["Size"], obj.get("ETag", "")))
    except ClientError as exc:
        if _code(exc) == "NoSuchBucket":
            raise DataError(f"bucket {bucket!r} does not exist ({uri})") from None
        raise
    out.sort(key=lambda e: e["key"])
    return out


def _entry(bucket: str, key: str, size: int, etag: str) -> dict[str, Any]:
    return {"uri": f"s3://{bucket}/{key}", "bucket": bucket, "key": key, "size": int(size), "etag": etag.strip('"')}


_status = s3.error_status
_code = s3.error_code


def exists(client: Any, uri: str) -> bool:
    parse_uri(uri)  # a bad URI is a DataError here
    return retrying(f"reading {uri}", lambda: s3.exists(client, uri))


def get_bytes(client: Any, uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object (kubetune.s3's contract)."""
    parse_uri(uri)
    return retrying(f"reading {uri}", lambda: s3.get_bytes(client, uri))


def get_required_bytes(client: Any, uri: str) -> bytes:
    """The object's bytes; DataError naming the URI when there is no such object (data that must be there)."""
    data = get_bytes(client, uri)
    if data is None:
        raise DataError(f"no such object: {uri}")
    return data


def put_bytes(client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    parse_uri(uri)
    retrying(f"writing {uri}", lambda: s3.put_bytes(client, uri, data, content_type))


def upload_file(client: Any, path: str, uri: str) -> None:
    """Upload a local file; boto3's transfer manager switches to multipart for large shards."""
    bucket, key = parse_uri(uri)
    retrying(f"uploading {uri}", lambda: client.upload_file(path, bucket, key))


def delete_prefix(client: Any, uri: str) -> int:
    """Delete every object under a folder prefix (hidden ones included); returns how many."""
    parse_uri(uri)
    return retrying(f"deleting under {uri}", lambda: s3.delete_prefix(client, uri))


class ObjectStream(io.RawIOBase):
    """A sequential read of one object that survives a dropped connection.

    A multi-gigabyte GET can break half-way; instead of failing the job (or starting over) it re-opens the
    object at the byte it had reached, pinned to the same ETag so a rewritten object is never spliced in.

    A reader that needs the bytes only up to about `stop` (a block of a large object: its lines end a little past
    its range) asks for [start, stop + TAIL_BYTES), then, if it reads on (a long last line), for twice as many bytes
    each time. An open-ended GET would have the server send the rest of the object to be thrown away, for every
    block, and the connection it came on could not serve the next block.
    """

    TAIL_BYTES = 64 << 10

    def __init__(self, client: Any, obj: dict[str, Any], start: int = 0, stop: int | None = None):
        self._client = client
        self._obj = obj
        self._pos = start
        self._size = int(obj["size"])
        self._stop = stop
        self._range_end = self._size  # where the open GET's bytes end
        self._tail = self.TAIL_BYTES  # how far past stop (or past the last range) the next GET reaches
        self._body = retrying(f"opening {obj['uri']}", self._open) if start < self._size else None

    def _open(self) -> Any:
        kw: dict[str, Any] = {"Bucket": self._obj["bucket"], "Key": self._obj["key"]}
        if self._obj.get("etag"):
            kw["IfMatch"] = f'"{self._obj["etag"]}"'
        self._range_end = self._size
        if self._stop is not None:
            self._range_end = min(max(self._stop, self._pos) + self._tail, self._size)
            kw["Range"] = f"bytes={self._pos}-{self._range_end - 1}"
        elif self._pos:
            kw["Range"] = f"bytes={self._pos}-"
        try:
            return self._client.get_object(**kw)["Body"]
        except ClientError as exc:
            if _status(exc) == 412:
                raise DataError(f"{self._obj['uri']} changed while it was being read") from None
            raise

    def readable(self) -> bool:
        return True

    def readinto(self, buf: Any) -> int:
        if self._pos >= self._size or self._body is None:
            return 0
        if self._pos >= self._range_end:  # a bounded range read to its end: a range twice as long
            self._tail *= 2
            self._body = retrying(f"reading {self._obj['uri']}", self._open)
        for attempt in range(_STREAM_RETRIES + 1):
            try:
                data = self._body.read(min(len(buf), self._range_end - self._pos))
                break
            except _STREAM_ERRORS as exc:
                if attempt == _STREAM_RETRIES:
                    raise
                log.warning("re-opening %s at byte %d after %s", self._obj["uri"], self._pos, type(exc).__name__)
                self._body = retrying(f"re-opening {self._obj['uri']}", self._open)
        n = len(data)
        buf[:n] = data
        self._pos += n
        return n

    def close(self) -> None:
        try:
            if self._body is not None and self._range_end - self._pos <= self.TAIL_BYTES:
                with contextlib.suppress(*_STREAM_ERRORS):
                    self._body.read()  # the few bytes left: read out, the connection goes back to the pool
            if self._body is not None:
                self._body.close()
        finally:
            super().close()


def open_stream(
    client: Any, obj: dict[str, Any], buffer_size: int = 256 << 10, start: int = 0, stop: int | None = None
) -> io.BufferedReader:
    """A buffered, line-iterable stream of one listed object (see list_objects), from byte `start` on (needed
    up to about `stop`: see ObjectStream)."""
    return io.BufferedReader(ObjectStream(client, obj, start, stop), buffer_size=buffer_size)


class RangeFile(io.RawIOBase):
    """A seekable read-only file over ranged GETs, so pyarrow reads a Parquet footer and one row group at a
    time instead of the whole object."""

    def __init__(self, client: Any, obj: dict[str, Any]):
        self._client = client
        self._obj = obj
        self._size = int(obj["size"])
        self._pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def tell(self) -> int:
        return self._pos

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self._pos, io.SEEK_END: self._size}[whence]
        self._pos = max(0, base + offset)
        return self._pos

    def size(self) -> int:
        return self._size

    def readinto(self, buf: Any) -> int:
        n = min(len(buf), self._size - self._pos)
        if n <= 0:
            return 0
        kw: dict[str, Any] = {
            "Bucket": self._obj["bucket"],
            "Key": self._obj["key"],
            "Range": f"bytes={self._pos}-{self._pos + n - 1}",
        }
        if self._obj.get("etag"):
            kw["IfMatch"] = f'"{self._obj["etag"]}"'
        data = retrying(f"reading {self._obj['uri']}", lambda: self._client.get_object(**kw)["Body"].read())
        buf[: len(data)] = data
        self._pos += len(data)
        return len(data)
