"""kubetune.fetch, the inference init container's download step, against a real S3 server (SeaweedFS)."""

from __future__ import annotations

import contextlib
import json
import os
import subprocess
import sys
import uuid
from pathlib import Path

import pytest

from kubetune.fetch import MARKER_NAME, FetchError, fetch_prefix, list_prefix, parse_s3_uri

pytestmark = pytest.mark.integration

BUCKET = "kt-fetch-test"


@pytest.fixture(scope="module")
def s3(s3_server):
    client = s3_server.client()
    with contextlib.suppress(client.exceptions.BucketAlreadyOwnedByYou):
        client.create_bucket(Bucket=BUCKET)
    return client


@pytest.fixture
def prefix() -> str:
    return f"runs/{uuid.uuid4().hex[:8]}/model"


def _put(client, key: str, data: bytes) -> None:
    client.put_object(Bucket=BUCKET, Key=key, Body=data)


def _files(root: Path) -> dict[str, bytes]:
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


OBJECTS = {
    "config.json": b'{"a": 1}',
    "model.safetensors": os.urandom(3 * 1024 * 1024 + 17),
    "tokenizer/tokenizer.json": b"{}" * 100,
}


def _seed(client, prefix: str) -> None:
    for rel, data in OBJECTS.items():
        _put(client, f"{prefix}/{rel}", data)
    # A sibling that shares the prefix string but is not in the folder must not be fetched.
    _put(client, f"{prefix}-v2/config.json", b"other")


def test_mirrors_prefix_then_skips_on_matching_marker(s3, s3_server, prefix, tmp_path):
    _seed(s3, prefix)
    uri = f"s3://{BUCKET}/{prefix}"
    first = fetch_prefix(uri, tmp_path / "m", client=s3)
    assert not first.skipped and first.files == 3
    assert first.bytes == first.downloaded_bytes == sum(len(v) for v in OBJECTS.values())
    got = _files(tmp_path / "m")
    marker = json.loads(got.pop(MARKER_NAME))
    assert got == OBJECTS
    assert marker["source"] == uri and set(marker["objects"]) == set(OBJECTS)

    again = fetch_prefix(uri + "/", tmp_path / "m", client=s3)  # the same folder, spelled with a slash
    assert again.skipped and again.downloaded_bytes == 0 and again.files == 3


def test_changed_object_is_downloaded_again_alone(s3, prefix, tmp_path):
    _seed(s3, prefix)
    uri = f"s3://{BUCKET}/{prefix}"
    fetch_prefix(uri, tmp_path, client=s3)
    _put(s3, f"{prefix}/config.json", b'{"a": 2, "changed": true}')
    res = fetch_prefix(uri, tmp_path, client=s3)
    assert not res.skipped and res.downloaded_bytes == len(b'{"a": 2, "changed": true}')
    assert (tmp_path / "config.json").read_bytes() == b'{"a": 2, "changed": true}'


def test_missing_file_defeats_the_marker(s3, prefix, tmp_path):
    _seed(s3, prefix)
    uri = f"s3://{BUCKET}/{prefix}"
    fetch_prefix(uri, tmp_path, client=s3)
    (tmp_path / "model.safetensors").unlink()
    res = fetch_prefix(uri, tmp_path, client=s3)
    assert not res.skipped
    assert (tmp_path / "model.safetensors").read_bytes() == OBJECTS["model.safetensors"]


def test_prune_removes_files_not_under_the_prefix(s3, prefix, tmp_path):
    _seed(s3, prefix)
    (tmp_path / "stale" / "old.bin").parent.mkdir(parents=True)
    (tmp_path / "stale" / "old.bin").write_bytes(b"x")
    fetch_prefix(f"s3://{BUCKET}/{prefix}", tmp_path, client=s3, prune=True)
    assert not (tmp_path / "stale").exists()
    assert set(_files(tmp_path)) == set(OBJECTS) | {MARKER_NAME}


def test_single_object_uri(s3, prefix, tmp_path):
    _put(s3, f"{prefix}.bin", b"0123456789")
    res = fetch_prefix(f"s3://{BUCKET}/{prefix}.bin", tmp_path, client=s3)
    assert res.files == 1 and (tmp_path / "model.bin").read_bytes() == b"0123456789"


def test_empty_prefix_is_an_error(s3, tmp_path):
    with pytest.raises(FetchError, match="no objects under"):
        fetch_prefix(f"s3://{BUCKET}/nothing/here", tmp_path, client=s3)


class _TruncatingClient:
    """Forwards to a real client but writes one byte less than it downloads."""

    def __init__(self, real):
        self._real = real

    def __getattr__(self, name):
        return getattr(self._real, name)

    def download_file(self, bucket, key, filename, **kw):
        self._real.download_file(bucket, key, filename, **kw)
        with open(filename, "r+b") as f:
            f.truncate(max(0, os.path.getsize(filename) - 1))


def test_size_mismatch_fails_and_leaves_no_marker(s3, prefix, tmp_path):
    _seed(s3, prefix)
    with pytest.raises(FetchError, match="bytes, listing says"):
        fetch_prefix(f"s3://{BUCKET}/{prefix}", tmp_path, client=_TruncatingClient(s3))
    assert not (tmp_path / MARKER_NAME).exists()
    assert not [p for p in tmp_path.rglob("*.part")]


def test_cli_as_the_init_container_runs_it(s3, s3_server, prefix, tmp_path):
    _seed(s3, prefix)
    env = {
        **os.environ,
        "AWS_ACCESS_KEY_ID": s3_server.access_key,
        "AWS_SECRET_ACCESS_KEY": s3_server.secret_key,
    }
    cmd = [
        sys.executable,
        "-m",
        "kubetune.fetch",
        f"s3://{BUCKET}/{prefix}",
        str(tmp_path / "m"),
        "--endpoint-url",
        s3_server.endpoint_url,
    ]
    out = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert json.loads(out.stdout)["files"] == 3
    bad = subprocess.run(
        cmd, env={**env, "AWS_SECRET_ACCESS_KEY": "wrong"}, capture_output=True, text=True, timeout=120
    )
    assert bad.returncode == 1
    assert bad.stderr.startswith("kubetune.fetch: error: ClientError") and "Traceback" not in bad.stderr


def test_parse_and_unsafe_keys():
    assert parse_s3_uri("s3://b/p/q") == ("b", "p/q")
    assert parse_s3_uri("s3://b") == ("b", "")
    with pytest.raises(ValueError):
        parse_s3_uri("http://b/p")

    class Stub:
        def get_paginator(self, _):
            class P:
                def paginate(self, **_):
                    yield {"Contents": [{"Key": "p/../../etc/passwd", "Size": 1, "ETag": '"x"'}]}

            return P()

    with pytest.raises(FetchError, match="unsafe"):
        list_prefix(Stub(), "b", "p")
