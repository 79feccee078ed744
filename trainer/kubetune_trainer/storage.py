"""Folder-level S3 operations the training side needs: upload a local folder, download a prefix, list every key
under a prefix (markers included), delete a prefix, small JSON objects.

Why not the data side's `list_objects`: it hides `_*` and `.*` keys on purpose (they are not data), but
checkpoints are judged by exactly such a marker (`_COMPLETE`). URIs and the client still come from
`kubetune_trainer.data.s3`, so both sides address S3 the same way.
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune_trainer.data.s3 import parse_uri


def join(base: str, *parts: str) -> str:
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def list_keys(client: Any, prefix_uri: str) -> list[dict[str, Any]]:
    """Every object under the folder `prefix_uri`: {"key", "rel" (path below the prefix), "size", "etag"}."""
    bucket, key = parse_uri(prefix_uri)
    prefix = key.rstrip("/") + "/" if key else ""
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []):
            if obj["Key"].endswith("/"):
                continue
            out.append({
                "key": obj["Key"],
                "rel": obj["Key"][len(prefix):],
                "size": int(obj["Size"]),
                "etag": str(obj.get("ETag", "")).strip('"'),
            })
    out.sort(key=lambda o: o["key"])
    return out


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


def delete_prefix(client: Any, prefix_uri: str) -> int:
    """Delete every object under the folder `prefix_uri`; returns how many."""
    bucket, _ = parse_uri(prefix_uri)
    keys = [o["key"] for o in list_keys(client, prefix_uri)]
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i:i + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)


def delete(client: Any, uri: str) -> None:
    bucket, key = parse_uri(uri)
    client.delete_object(Bucket=bucket, Key=key)


def put_json(client: Any, uri: str, obj: Any) -> None:
    bucket, key = parse_uri(uri)
    body = json.dumps(obj, indent=1, sort_keys=True).encode()
    client.put_object(Bucket=bucket, Key=key, Body=body, ContentType="application/json")


def get_json(client: Any, uri: str) -> Any:
    bucket, key = parse_uri(uri)
    return json.loads(client.get_object(Bucket=bucket, Key=key)["Body"].read())


def put_bytes(client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    bucket, key = parse_uri(uri)
    client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def get_bytes(client: Any, uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    bucket, key = parse_uri(uri)
    try:
        return client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except client.exceptions.NoSuchKey:
        return None
