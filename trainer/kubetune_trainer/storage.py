"""Folder-level S3 operations the training side needs: upload a local folder, download a prefix, list every key
under a prefix (markers included), delete a prefix, small JSON objects.

Why not the data side's `list_objects`: it hides `_*` and `.*` keys on purpose (they are not data), but
checkpoints are judged by exactly such a marker (`_COMPLETE`). Listing, small objects and deletes are the core's
`kubetune.s3` (one contract everywhere: a missing key reads as None), re-exported under the names used here.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import s3
from kubetune.s3 import delete, delete_prefix, get_bytes, get_json, list_keys, parse_uri, put_bytes, put_json

__all__ = [
    "delete", "delete_prefix", "download", "get_bytes", "get_json", "join", "list_keys", "put_bytes", "put_json",
    "upload_dir",
]


join = s3.join_uri


def upload_dir(client: Any, local_dir: str | Path, prefix_uri: str) -> list[str]:
    """Upload every file below `local_dir` to `prefix_uri`, keeping relative paths; returns the URIs."""
    bucket, key = parse_uri(prefix_uri)
    base = key.rstrip("/")
    uris = []
    for path in sorted(p for p in Path(local_dir).rglob("*") if p.is_file()):
        rel = path.relative_to(local_dir).as_posix()
        obj_key = f"{base}/{rel}" if base else rel
        client.upload_file(str(path), bucket, obj_key)
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
            client.download_file(bucket, obj["key"], tmp)
            os.replace(tmp, dest)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        total += obj["size"]
    return total
