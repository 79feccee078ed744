"""Equal, deterministic shards; reuse of a completed preparation; redo of a half-written one."""

from __future__ import annotations

import importlib
import io
import json

import numpy as np
import pyarrow.parquet as pq
import pytest

from kubetune_trainer.data import DataError, batch_indices, load_shard, open_shard, prepare
from kubetune_trainer.data.s3 import list_objects, parse_uri

pytestmark = pytest.mark.integration

# The package re-exports the function prepare(), which shadows the submodule as an attribute.
executors_module = importlib.import_module("kubetune_trainer.data.executors")
shards_module = importlib.import_module("kubetune_trainer.data.shards")
cache_module = importlib.import_module("kubetune_trainer.data.cache")
worker_module = importlib.import_module("kubetune_trainer.data.worker")  # where every block is read

RECORDS = [{"text": f"record {i}: " + "lorem ipsum " * (i % 5)} for i in range(100)]


def _cfg(make_cfg, uri, name="job", **pre):
    return make_cfg(
        {"train": uri, "format": "completion", "preprocessing": {"packing": False, "maxSeqLength": 32, **pre}},
        name=name,
    )


def test_shards_equal_sized_and_deterministic(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    monkeypatch.setattr(shards_module, "ROW_GROUP_TOKENS", 256)  # several row groups per shard
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    p = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=3, client=s3)
    assert len(p.train_shards) == 3 and p.rows_per_shard == 33 and p.dropped_sequences == 1
    assert p.num_train_sequences == p.stats["sequences"] == 99
    shards = [load_shard([u], client=s3) for u in p.train_shards]
    assert [len(s["input_ids"]) for s in shards] == [33, 33, 33]
    # What a training rank does: stream the shard into local memory maps (one row group in memory at a time).
    bucket, key = parse_uri(p.train_shards[0])
    body = s3.get_object(Bucket=bucket, Key=key)["Body"].read()
    assert pq.ParquetFile(io.BytesIO(body)).num_row_groups > 1
    streamed = open_shard(p.train_shards[:2], client=s3)
    assert all(isinstance(v, np.memmap) for v in streamed.values())
    for k in shards[0]:
        assert np.array_equal(streamed[k], np.concatenate([shards[0][k], shards[1][k]]))
    assert all(s["input_ids"].shape[1] == p.seq_length for s in shards)
    assert p.stats["tokens"] == sum(int(s["attention_mask"].sum()) for s in shards)
    # Every kept row appears once; shards are disjoint.
    rows = {tuple(r) for s in shards for r in s["input_ids"]}
    assert len(rows) == 99

    # Another run of the same inputs (another job, or a re-created one) uses the same prepared shards.
    q = prepare(_cfg(make_cfg, uri, name="again"), tokenizer, num_shards=3, client=s3)
    assert q == p

    # Another worker count is another preparation.
    r = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=4, client=s3)
    assert r.fingerprint != p.fingerprint and r.rows_per_shard == 25 and r.dropped_sequences == 0


def test_completed_preparation_is_reused_without_reading(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    p = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=2, client=s3)
    cache_prefix = f"s3://kubetune-test/{prefix}/out/_kubetune/prepared/{p.fingerprint}"
    assert p.manifest_uri.startswith(cache_prefix + "/attempts/")
    before = {o["key"]: o["etag"] for o in list_objects(s3, cache_prefix)}

    def no_reading(*a, **k):
        raise AssertionError("a completed preparation must not read the data again")

    monkeypatch.setattr(worker_module, "read_records", no_reading)
    monkeypatch.setattr(worker_module, "read_jsonl_range", no_reading)
    # A second run (another job name: another run prefix) of the same data: the cache, no source read.
    again = prepare(_cfg(make_cfg, uri, name="second"), tokenizer, num_shards=2, client=s3)
    assert again == p
    assert {o["key"]: o["etag"] for o in list_objects(s3, cache_prefix)} == before  # nothing rewritten
    # Each run keeps its own record of the data it used.
    for job in ("job", "second"):
        run_copy = s3.get_object(
            Bucket="kubetune-test", Key=f"{prefix}/out/default/{job}/prepared/{p.fingerprint}/manifest.json"
        )
        assert json.loads(run_copy["Body"].read())["manifest_uri"] == p.manifest_uri

    # Changed data (a new ETag) is another key, prepared afresh.
    monkeypatch.undo()
    put(f"{prefix}/d.jsonl", RECORDS[:50])
    changed = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=2, client=s3)
    assert changed.fingerprint != p.fingerprint and changed.stats["records"] == 50
    assert changed.manifest_uri.startswith(f"s3://kubetune-test/{prefix}/out/_kubetune/prepared/{changed.fingerprint}/")


def test_half_written_preparation_is_never_published_nor_deleted(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    cfg = _cfg(make_cfg, uri)
    real_write = executors_module.write_shard

    def crash_on_the_second_shard(columns, rows, width, local_path, client, uri):
        if uri.endswith("part-00001.parquet"):
            raise RuntimeError("worker killed")
        return real_write(columns, rows, width, local_path, client, uri)

    monkeypatch.setattr(executors_module, "write_shard", crash_on_the_second_shard)
    with pytest.raises(RuntimeError, match="worker killed"):
        prepare(cfg, tokenizer, num_shards=2, client=s3)
    monkeypatch.undo()
    cache_prefix = f"s3://kubetune-test/{prefix}/out/_kubetune/prepared"
    leftovers = [o["key"] for o in list_objects(s3, cache_prefix)]
    assert len(leftovers) == 1 and leftovers[0].endswith("train/part-00000.parquet")

    p = prepare(cfg, tokenizer, num_shards=2, client=s3)
    keys = {o["key"] for o in list_objects(s3, cache_prefix)}
    assert set(leftovers) <= keys  # the dead attempt's file is left alone (another writer's folder)...
    assert leftovers[0] not in {parse_uri(u)[1] for u in p.train_shards}  # ...and never read
    attempt = parse_uri(p.manifest_uri)[1].rsplit("/", 1)[0]
    mine = sorted(k.removeprefix(attempt + "/") for k in keys if k.startswith(attempt + "/"))
    assert mine == ["manifest.json", "stats.json", "train/part-00000.parquet", "train/part-00001.parquet"]
    assert sum(len(load_shard([u], client=s3)["input_ids"]) for u in p.train_shards) == 100


def test_concurrent_writers_publish_once_with_identical_output(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    """A second writer that looked before the first one published prepares too (deterministically: the same
    bytes), finds the marker taken, and uses the first one's output; neither output is overwritten."""
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    first = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=2, client=s3)
    marker_key = f"{prefix}/out/_kubetune/prepared/{first.fingerprint}/_COMPLETE"
    marker = s3.get_object(Bucket="kubetune-test", Key=marker_key)
    monkeypatch.setattr(cache_module, "lookup", lambda *a: None)  # it looked while the first was running
    second = prepare(_cfg(make_cfg, uri, name="racer"), tokenizer, num_shards=2, client=s3)
    assert second == first
    assert s3.get_object(Bucket="kubetune-test", Key=marker_key)["ETag"] == marker["ETag"]
    attempts = {
        parse_uri(o["uri"])[1].split("/attempts/")[1].split("/")[0]
        for o in list_objects(s3, f"s3://kubetune-test/{prefix}/out/_kubetune/prepared/{first.fingerprint}/attempts")
    }
    assert len(attempts) == 2  # both outputs are whole; the loser's is left, unused
    base = f"s3://kubetune-test/{prefix}/out/_kubetune/prepared/{first.fingerprint}/attempts"
    other = (attempts - {first.manifest_uri.split("/attempts/")[1].split("/")[0]}).pop()
    for shard in first.train_shards:
        twin = f"{base}/{other}/" + shard.split("/attempts/")[1].split("/", 1)[1]
        x, y = load_shard([shard], client=s3), load_shard([twin], client=s3)
        assert all(np.array_equal(x[k], y[k]) for k in x)


def test_fewer_sequences_than_workers_fails(tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/tiny.jsonl", RECORDS[:3])
    with pytest.raises(DataError, match="only 3 training sequences .* 4 workers"):
        prepare(_cfg(make_cfg, uri), tokenizer, num_shards=4, client=s3)


def test_no_objects_fails(tokenizer, s3, prefix, make_cfg):
    with pytest.raises(DataError, match="no data objects"):
        prepare(_cfg(make_cfg, f"s3://kubetune-test/{prefix}/nothing-here"), tokenizer, num_shards=1, client=s3)


def test_load_shard_with_client_from_environment(tokenizer, s3, s3_server, put, prefix, make_cfg, monkeypatch):
    uri = put(f"{prefix}/d.jsonl", RECORDS[:10])
    p = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=1, client=s3)
    for k, v in s3_server.env().items():
        monkeypatch.setenv(k, v)
    arrays = load_shard(p.train_shards)  # endpoint and keys from AWS_* variables, as in a worker pod
    assert arrays["input_ids"].shape == (10, p.seq_length)


def test_batch_indices_deterministic_and_resumable():
    a = batch_indices(103, 8, epoch=0, seed=42)
    assert len(a) == 12 and all(len(b) == 8 for b in a)
    flat = np.concatenate(a)
    assert len(set(flat.tolist())) == 96 and flat.max() < 103
    assert all(np.array_equal(x, y) for x, y in zip(a, batch_indices(103, 8, epoch=0, seed=42)))
    # Resuming at batch 5 is just the same list from index 5.
    assert all(np.array_equal(x, y) for x, y in zip(a[5:], batch_indices(103, 8, 0, 42)[5:]))
    assert not np.array_equal(np.concatenate(batch_indices(103, 8, epoch=1, seed=42)), flat)
    assert not np.array_equal(np.concatenate(batch_indices(103, 8, epoch=0, seed=43)), flat)
    assert batch_indices(5, 8, 0, 0) == []
