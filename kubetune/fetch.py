"""Download everything under an S3 prefix into a local folder: what the inference init container runs.

    python -m kubetune.fetch s3://bucket/models/job-1/model /models/model [--endpoint-url URL] [--region R]

The folder ends up mirroring the prefix (``s3://b/p/config.json`` -> ``dest/config.json``, nested keys keep
their sub-folders). Every object is downloaded to a temporary ``*.part`` file, its size is checked against the
listing, and only then renamed into place. When all objects are in, a completion marker
(:data:`MARKER_NAME`) recording the source URI and each object's size and ETag is written last. A later run
(a restarted pod, a warm node-local cache) that finds a marker matching the current listing, with every file
present at the listed size, downloads nothing.

Credentials come from the arguments or boto3's usual chain (``AWS_ACCESS_KEY_ID`` / ``AWS_SECRET_ACCESS_KEY``,
e.g. from the job's ``credentialsSecret`` mounted as env); the endpoint from ``--endpoint-url`` or
``AWS_ENDPOINT_URL`` / ``S3_ENDPOINT_URL``. Files in ``dest`` that are not under the prefix are left alone
unless ``prune=True`` (``--prune``).

Needs only boto3 (no torch), so the init container can be a small image.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath
from typing import Any

from kubetune import s3
from kubetune.clock import now_rfc3339

MARKER_NAME = ".kubetune-fetch.json"
MARKER_VERSION = 1


class FetchError(RuntimeError):
    """The prefix could not be mirrored (empty prefix, size mismatch, unsafe key...)."""


@dataclass
class FetchResult:
    source: str
    dest: Path
    skipped: bool  # True when the completion marker matched and nothing was downloaded
    files: int
    bytes: int
    downloaded_bytes: int
    seconds: float
    keys: list[str] = field(default_factory=list)  # paths relative to dest

    def as_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "dest": str(self.dest),
            "skipped": self.skipped,
            "files": self.files,
            "bytes": self.bytes,
            "downloaded_bytes": self.downloaded_bytes,
            "seconds": round(self.seconds, 3),
        }


def parse_s3_uri(uri: str) -> tuple[str, str]:
    """``s3://bucket/some/prefix`` -> ``("bucket", "some/prefix")``. The prefix may be empty (kubetune.s3)."""
    return s3.parse_uri(uri)


def make_s3_client(
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    session_token: str | None = None,
) -> Any:
    """A boto3 S3 client (kubetune.s3.make_client: path-style addressing when a custom endpoint is given)."""
    return s3.make_client(
        endpoint_url, region=region, access_key=access_key, secret_key=secret_key, session_token=session_token
    )


def _safe_relpath(rel: str, key: str) -> PurePosixPath:
    p = PurePosixPath(rel)
    if not rel or p.is_absolute() or any(part in ("", ".", "..") for part in rel.split("/")):
        raise FetchError(f"refusing to write object {key!r}: unsafe relative path {rel!r}")
    return p


def list_prefix(client: Any, bucket: str, prefix: str) -> dict[str, dict[str, Any]]:
    """Objects under ``prefix`` treated as a folder: ``{relative_path: {"key", "size", "etag"}}``.

    ``s3://b/model`` matches ``model/...`` (not ``model-v2/...``). If nothing lies under the folder but an
    object is named exactly ``prefix``, that single object is returned under its base name.
    """
    folder = prefix.rstrip("/")
    folder = folder + "/" if folder else ""
    out: dict[str, dict[str, Any]] = {}
    paginator = client.get_paginator("list_objects_v2")
    for page in paginator.paginate(Bucket=bucket, Prefix=folder):
        for obj in page.get("Contents", []) or []:
            key = obj["Key"]
            if key.endswith("/"):
                continue  # "directory" placeholder objects
            rel = key[len(folder) :]
            _safe_relpath(rel, key)
            out[rel] = {"key": key, "size": int(obj["Size"]), "etag": str(obj.get("ETag", "")).strip('"')}
    if not out and prefix and not prefix.endswith("/"):
        try:
            head = client.head_object(Bucket=bucket, Key=prefix)
        except Exception:  # noqa: BLE001 - a missing object is "nothing there"
            head = None
        if head is not None:
            rel = PurePosixPath(prefix).name
            out[rel] = {"key": prefix, "size": int(head["ContentLength"]), "etag": str(head.get("ETag", "")).strip('"')}
    return out


def _marker_matches(dest: Path, source: str, listing: dict[str, dict[str, Any]]) -> bool:
    marker = dest / MARKER_NAME
    try:
        data = json.loads(marker.read_text())
    except (OSError, ValueError):
        return False
    if data.get("version") != MARKER_VERSION or data.get("source") != source:
        return False
    want = {rel: {"size": o["size"], "etag": o["etag"]} for rel, o in listing.items()}
    if data.get("objects") != want:
        return False
    for rel, o in listing.items():
        try:
            if (dest / rel).stat().st_size != o["size"]:
                return False
        except OSError:
            return False
    return True


def fetch_prefix(
    s3_uri: str,
    dest_dir: str | os.PathLike[str],
    endpoint_url: str | None = None,
    *,
    region: str | None = None,
    access_key: str | None = None,
    secret_key: str | None = None,
    client: Any = None,
    prune: bool = False,
    force: bool = False,
) -> FetchResult:
    """Mirror every object under ``s3_uri`` into ``dest_dir`` (see the module docstring).

    Raises :class:`FetchError` if the prefix holds no object or a downloaded file's size differs from the
    listing. Pass ``client`` to reuse a boto3 client (then endpoint/credentials arguments are ignored).
    """
    t0 = time.monotonic()
    bucket, prefix = parse_s3_uri(s3_uri)
    s3_uri = f"s3://{bucket}/{prefix.rstrip('/')}"  # one spelling per folder in the marker
    if client is None:
        client = make_s3_client(endpoint_url, region=region, access_key=access_key, secret_key=secret_key)
    dest = Path(dest_dir)
    listing = list_prefix(client, bucket, prefix)
    if not listing:
        raise FetchError(f"no objects under {s3_uri}")
    total = sum(o["size"] for o in listing.values())
    keys = sorted(listing)

    if not force and _marker_matches(dest, s3_uri, listing):
        return FetchResult(s3_uri, dest, True, len(listing), total, 0, time.monotonic() - t0, keys)

    dest.mkdir(parents=True, exist_ok=True)
    # Files an earlier complete fetch of the same source vouched for, unchanged since, are kept (an updated
    # prefix re-downloads only what changed). Then the marker goes: until the end, the folder is incomplete.
    old = {} if force else _old_marker_objects(dest, s3_uri)
    (dest / MARKER_NAME).unlink(missing_ok=True)
    downloaded = 0
    for rel in keys:
        o = listing[rel]
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if old.get(rel) == {"size": o["size"], "etag": o["etag"]} and o["etag"] and _size_of(target) == o["size"]:
            continue
        part = target.with_name(target.name + ".part")
        part.unlink(missing_ok=True)
        client.download_file(bucket, o["key"], str(part))
        got = part.stat().st_size
        if got != o["size"]:
            part.unlink(missing_ok=True)
            raise FetchError(f"s3://{bucket}/{o['key']}: downloaded {got} bytes, listing says {o['size']}")
        os.replace(part, target)
        downloaded += got

    if prune:
        wanted = {dest / rel for rel in keys}
        for path in sorted(dest.rglob("*"), reverse=True):
            if path.is_file() and path not in wanted and path.name != MARKER_NAME:
                path.unlink()
            elif path.is_dir() and not any(path.iterdir()):
                path.rmdir()

    marker = {
        "version": MARKER_VERSION,
        "source": s3_uri,
        "objects": {rel: {"size": listing[rel]["size"], "etag": listing[rel]["etag"]} for rel in keys},
        "completed_at": now_rfc3339(),
    }
    tmp = dest / (MARKER_NAME + ".tmp")
    tmp.write_text(json.dumps(marker, indent=1, sort_keys=True))
    os.replace(tmp, dest / MARKER_NAME)
    return FetchResult(s3_uri, dest, False, len(listing), total, downloaded, time.monotonic() - t0, keys)


def _old_marker_objects(dest: Path, source: str) -> dict[str, Any]:
    try:
        data = json.loads((dest / MARKER_NAME).read_text())
    except (OSError, ValueError):
        return {}
    if data.get("version") != MARKER_VERSION or data.get("source") != source:
        return {}
    return data.get("objects") or {}


def _size_of(path: Path) -> int:
    try:
        return path.stat().st_size if path.is_file() else -1
    except OSError:
        return -1


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m kubetune.fetch", description=__doc__.split("\n\n")[0])
    ap.add_argument("s3_uri", help="s3://bucket/prefix")
    ap.add_argument("dest_dir")
    ap.add_argument("--endpoint-url", default=None, help="S3 endpoint (default: $AWS_ENDPOINT_URL / $S3_ENDPOINT_URL)")
    ap.add_argument("--region", default=None)
    ap.add_argument("--prune", action="store_true", help="delete files in dest_dir that are not under the prefix")
    ap.add_argument("--force", action="store_true", help="download even if the completion marker matches")
    args = ap.parse_args(argv)
    try:
        res = fetch_prefix(
            args.s3_uri, args.dest_dir, args.endpoint_url, region=args.region, prune=args.prune, force=args.force
        )
    except Exception as exc:  # an init container should fail with one clear line (others are re-raised)
        from botocore.exceptions import BotoCoreError, ClientError

        if not isinstance(exc, (FetchError, ValueError, OSError, BotoCoreError, ClientError)):
            raise
        print(f"kubetune.fetch: error: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(res.as_dict()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
