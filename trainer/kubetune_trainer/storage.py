"""Folder-level S3 operations the training side needs: upload a local folder, download a prefix, list every key
under a prefix (markers included), delete a prefix, small JSON objects.

Why not the data side's `list_objects`: it hides `_*` and `.*` keys on purpose (they are not data), but
checkpoints are judged by exactly such a marker (`_COMPLETE`). Listing, small objects and deletes are the core's
`kubetune.s3` (one contract everywhere: a missing key reads as None), under the names used here.

Every request goes through `retrying`: while the S3 server is unreachable (restarting, a network blip) the call
waits with exponential backoff (up to KUBETUNE_S3_OUTAGE_S, 120 s) instead of failing the training, one object
at a time, so an upload cut off half-way goes on from the object it had reached.
"""

from __future__ import annotations

import functools
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import s3
from kubetune.s3 import parse_uri
from kubetune_trainer.data.s3 import retrying

__all__ = [
    "delete",
    "delete_prefix",
    "download",
    "get_bytes",
    "get_json",
    "join",
    "list_keys",
    "put_bytes",
    "put_json",
    "upload_dir",
]


join = s3.join_uri


def list_keys(client: Any, prefix_uri: str) -> list[dict[str, Any]]:
    return retrying(f"listing {prefix_uri}", lambda: s3.list_keys(client, prefix_uri))


def delete(client: Any, uri: str) -> None:
    retrying(f"deleting {uri}", lambda: s3.delete(client, uri))


def delete_prefix(client: Any, prefix_uri: str) -> int:
    return retrying(f"deleting under {prefix_uri}", lambda: s3.delete_prefix(client, prefix_uri))


def get_bytes(client: Any, uri: str) -> bytes | None:
    return retrying(f"reading {uri}", lambda: s3.get_bytes(client, uri))


def get_json(client: Any, uri: str) -> Any:
    return retrying(f"reading {uri}", lambda: s3.get_json(client, uri))


def put_bytes(client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    retrying(f"writing {uri}", lambda: s3.put_bytes(client, uri, data, content_type))


def put_json(client: Any, uri: str, obj: Any) -> None:
    retrying(f"writing {uri}", lambda: s3.put_json(client, uri, obj))


def upload_dir(client: Any, local_dir: str | Path, prefix_uri: str) -> list[str]:
    """Upload every file below `local_dir` to `prefix_uri`, keeping relative paths; returns the URIs."""
    bucket, key = parse_uri(prefix_uri)
    base = key.rstrip("/")
    uris = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        obj_key = f"{base}/{rel}" if base else rel
        retrying(
            f"uploading s3://{bucket}/{obj_key}", functools.partial(client.upload_file, str(path), bucket, obj_key)
        )
        uris.append(f"s3://{bucket}/{obj_key}")
    return uris


def download(client: Any, prefix_uri: str, local_dir: str | Path, want: Callable[[str], bool] | None = None) -> int:
    """Download the objects under `prefix_uri` (those whose relative path `want` accepts) into `local_dir`.

    Each file is written to a temporary name and renamed, so a reader never sees a half-written file.
    Returns the number of bytes downloaded.
    """
    bucket, _ = parse_uri(prefix_uri)
    local_dir = Path(local_dir)
    total = 0
    for obj in list_keys(client, prefix_uri):
        if want is not None and not want(obj["rel"]):
            continue
        dest = local_dir / obj["rel"]
        dest.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(prefix=f".{dest.name}.", dir=dest.parent)
        os.close(fd)
        try:
            retrying(
                f"downloading s3://{bucket}/{obj['key']}",
                functools.partial(client.download_file, bucket, obj["key"], tmp),
            )
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        total += obj["size"]
    return total
