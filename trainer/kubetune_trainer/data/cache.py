"""The content-addressed cache of prepared data, shared by every run that writes to the same output location.

    <output.uri>/_kubetune/prepared/<fingerprint>/
        attempts/<id>/train/..., validation/..., stats.json, manifest.json   one writer's complete output each
        _COMPLETE                  {"manifest": "<uri of one attempt's manifest.json>"}: written once, last

The fingerprint (fingerprint.py) names everything the prepared rows depend on (dataset spec, the objects'
ETags and sizes, tokenizer, seed, shard count), so a re-created job (a new incarnation prefix) or a second
`kubetune run` of the same data finds _COMPLETE and reads no source. (`_kubetune` cannot clash with a run's
folder: run prefixes start with a Kubernetes namespace, which cannot begin with "_".)

Writers never share a folder: each writes its own attempt (a random id) and then creates _COMPLETE with a
conditional put (If-None-Match: *), which S3 and SeaweedFS turn down when the marker exists. Of two concurrent
writers the first to finish publishes; the other sees the refusal and uses the published attempt, whose rows
are identical (preparation is deterministic). Nothing here is ever deleted or overwritten: an attempt that
died half-way is never named by a marker and never read (an S3 lifecycle rule on `attempts/` may expire such
leftovers after a few days; a completed attempt must stay while runs refer to it).

Each run also keeps a copy of the manifest it used under its own prefix, <run_uri>/prepared/<fingerprint>/
manifest.json, so a run's record of its data (read by a resize, and by people) lives with the run.
"""

from __future__ import annotations

import json
import logging
import secrets
from typing import Any

from botocore.exceptions import ClientError

from kubetune_trainer.data.s3 import _status, get_bytes, join_uri, parse_uri, put_bytes, retrying

log = logging.getLogger(__name__)

CACHE_FOLDER = "_kubetune/prepared"
COMPLETE_MARKER = "_COMPLETE"


def cache_root(output_uri: str) -> str:
    return join_uri(output_uri, CACHE_FOLDER)


def lookup(client: Any, root: str, fp: str) -> dict[str, Any] | None:
    """The published manifest for this fingerprint, or None when no preparation has completed yet."""
    marker = get_bytes(client, join_uri(root, fp, COMPLETE_MARKER))
    if marker is None:
        return None
    body = get_bytes(client, json.loads(marker)["manifest"])
    if body is None:  # a marker always points at a whole attempt: a missing manifest is a broken store
        raise RuntimeError(f"{join_uri(root, fp, COMPLETE_MARKER)} names a manifest that is not there")
    manifest: dict[str, Any] = json.loads(body)
    return manifest


def new_attempt(root: str, fp: str) -> str:
    """A folder of this writer's own for one preparation."""
    return join_uri(root, fp, "attempts", secrets.token_hex(6))


def publish(client: Any, root: str, fp: str, manifest_uri: str) -> str:
    """Create the marker naming this attempt's manifest, unless another writer did first; returns the
    manifest URI that is published (this one, or the other writer's)."""
    uri = join_uri(root, fp, COMPLETE_MARKER)
    bucket, key = parse_uri(uri)
    body = json.dumps({"manifest": manifest_uri}).encode()
    try:
        retrying(
            f"writing {uri}",
            lambda: client.put_object(
                Bucket=bucket, Key=key, Body=body, ContentType="application/json", IfNoneMatch="*"
            ),
        )
        return manifest_uri
    except ClientError as exc:
        if _status(exc) not in (409, 412):  # 412 Precondition Failed; 409 for a put racing another
            raise
    marker = get_bytes(client, uri)
    assert marker is not None
    published: str = json.loads(marker)["manifest"]
    log.info("another writer published %s first; using it (this attempt's identical output stays unused)", published)
    return published


def record_for_run(client: Any, run_uri: str, fp: str, manifest: dict[str, Any]) -> None:
    """The run's own copy of the manifest it trains on (under its prefix, never shared)."""
    body = json.dumps(manifest, indent=2).encode()
    put_bytes(client, join_uri(run_uri, "prepared", fp, "manifest.json"), body, "application/json")
