"""The one S3 client of kubetune: make a client, parse and join s3:// URIs, get/put/list/delete objects.

Used by the weight fetcher (kubetune.fetch, in the inference image), the trainer (data and storage) and the CLI,
so every component addresses S3 the same way. Imports only the standard library and boto3/botocore: the
inference image installs kubetune without its dependencies.

The contract for a key that is not there: `get_bytes` and `get_json` return None (they never raise for it);
callers that need the object say so with their own error. Listings treat a URI as a folder (a trailing "/" is
implied, so s3://b/data never picks up s3://b/data-old.jsonl).

Credentials are never passed around in config: boto3 reads AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY
(/ AWS_SESSION_TOKEN) from the environment, where the pod mounts the job's credentialsSecret, unless a caller
holding keys (the CLI, reading a job's Secret) passes them. Nothing here logs a request, a header or an
exception's full repr.
"""

from __future__ import annotations

import json
import os
from typing import Any


class S3UriError(ValueError):
    """Not an s3://bucket/key URI."""


def make_client(
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
    max_attempts: int = 10,
    connect_timeout: float = 10,
    read_timeout: float = 120,
    unsigned: bool = False,
) -> Any:
    """A boto3 S3 client for `endpoint_url` (else $AWS_ENDPOINT_URL / $S3_ENDPOINT_URL, else AWS).

    Path-style addressing with a custom endpoint, because S3-compatible servers (SeaweedFS, MinIO, Ceph) rarely
    have wildcard DNS for virtual-hosted buckets; standard retry mode rides out throttling and brief outages
    (`max_attempts` counts the first try: 1 is no retry). A fresh session, not boto3's default one: the default
    session caches the first credentials it resolved for the life of the process, so rotated keys (or a test
    switching them) would go unnoticed. `unsigned` sends anonymous requests (no credentials looked up at all),
    as a client of a public bucket does.
    """
    import boto3
    from botocore import UNSIGNED
    from botocore.config import Config

    endpoint_url = endpoint_url or os.environ.get("AWS_ENDPOINT_URL") or os.environ.get("S3_ENDPOINT_URL")
    config = Config(
        region_name=region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or "us-east-1",
        signature_version=UNSIGNED if unsigned else "s3v4",
        s3={"addressing_style": "path"} if endpoint_url else {},
        retries={"max_attempts": max_attempts, "mode": "standard"},
        connect_timeout=connect_timeout,
        read_timeout=read_timeout,
    )
    return boto3.session.Session().client(
        "s3",
        endpoint_url=endpoint_url or None,
        aws_access_key_id=access_key,
        aws_secret_access_key=secret_key,
        aws_session_token=session_token,
        config=config,
    )


def parse_uri(uri: str) -> tuple[str, str]:
    """s3://bucket/some/key -> ("bucket", "some/key"); the key is "" for a bare bucket. S3UriError otherwise."""
    if not isinstance(uri, str) or not uri.startswith("s3://"):
        raise S3UriError(f"not an s3:// URI: {uri!r}")
    bucket, _, key = uri[len("s3://") :].partition("/")
    if not bucket or "@" in bucket:
        raise S3UriError(f"not an s3://bucket/key URI: {uri!r}")
    return bucket, key


def join_uri(base: str, *parts: str) -> str:
    """Join an s3:// prefix and relative parts with single slashes."""
    out = base.rstrip("/")
    for part in parts:
        out += "/" + part.strip("/")
    return out


def _folder(key: str) -> str:
    return key.rstrip("/") + "/" if key else ""


def error_code(exc: Any) -> str:
    """The S3 error code of a botocore ClientError (NoSuchKey, NoSuchBucket, 404, ...)."""
    return str(getattr(exc, "response", {}).get("Error", {}).get("Code", ""))


def error_status(exc: Any) -> int:
    """The HTTP status of a botocore ClientError (0 when unknown)."""
    return int(getattr(exc, "response", {}).get("ResponseMetadata", {}).get("HTTPStatusCode", 0) or 0)


def is_missing(exc: BaseException) -> bool:
    """True for a ClientError that says the key (or its bucket) is not there."""
    from botocore.exceptions import ClientError

    return isinstance(exc, ClientError) and (
        error_code(exc) in ("NoSuchKey", "404", "NotFound", "NoSuchBucket") or error_status(exc) == 404
    )


def exists(client: Any, uri: str) -> bool:
    """Whether the object exists (a 403 on HEAD, as S3 answers without ListBucket rights, counts as no)."""
    from botocore.exceptions import ClientError

    bucket, key = parse_uri(uri)
    try:
        client.head_object(Bucket=bucket, Key=key)
        return True
    except ClientError as exc:
        if error_status(exc) in (404, 403) or error_code(exc) in ("NoSuchKey", "404"):
            return False
        raise


def get_bytes(client: Any, uri: str) -> bytes | None:
    """The object's bytes, or None when there is no such object."""
    bucket, key = parse_uri(uri)
    try:
        data: bytes = client.get_object(Bucket=bucket, Key=key)["Body"].read()
    except Exception as exc:
        if is_missing(exc):
            return None
        raise
    return data


def put_bytes(client: Any, uri: str, data: bytes, content_type: str = "application/octet-stream") -> None:
    bucket, key = parse_uri(uri)
    client.put_object(Bucket=bucket, Key=key, Body=data, ContentType=content_type)


def get_json(client: Any, uri: str) -> Any:
    """The object parsed as JSON, or None when there is no such object."""
    raw = get_bytes(client, uri)
    return None if raw is None else json.loads(raw)


def put_json(client: Any, uri: str, obj: Any) -> None:
    body = json.dumps(obj, indent=1, sort_keys=True).encode()
    put_bytes(client, uri, body, content_type="application/json")


def list_keys(client: Any, prefix_uri: str) -> list[dict[str, Any]]:
    """Every object under the folder `prefix_uri`, hidden ones and markers included, sorted by key.

    Each entry: {"key", "rel" (the path below the prefix), "size", "etag"}; folder placeholders (keys ending
    in "/") are skipped.
    """
    bucket, key = parse_uri(prefix_uri)
    prefix = _folder(key)
    out = []
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix):
        for obj in page.get("Contents", []) or []:
            if obj["Key"].endswith("/"):
                continue
            out.append(
                {
                    "key": obj["Key"],
                    "rel": obj["Key"][len(prefix) :],
                    "size": int(obj["Size"]),
                    "etag": str(obj.get("ETag", "")).strip('"'),
                }
            )
    out.sort(key=lambda o: o["key"])
    return out


def delete(client: Any, uri: str) -> None:
    bucket, key = parse_uri(uri)
    client.delete_object(Bucket=bucket, Key=key)


def delete_prefix(client: Any, prefix_uri: str) -> int:
    """Delete every object under the folder `prefix_uri` (hidden ones included); returns how many."""
    bucket, _ = parse_uri(prefix_uri)
    keys = [o["key"] for o in list_keys(client, prefix_uri)]
    for i in range(0, len(keys), 1000):
        batch = [{"Key": k} for k in keys[i : i + 1000]]
        client.delete_objects(Bucket=bucket, Delete={"Objects": batch, "Quiet": True})
    return len(keys)
