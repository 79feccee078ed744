"""Equal, deterministic shards; reuse of a completed preparation; redo of a half-written one."""

from __future__ import annotations

import importlib

import numpy as np
import pytest

from kubetune_trainer.data import DataError, batch_indices, load_shard, open_shard, prepare
from kubetune_trainer.data.s3 import list_objects, parse_uri

pytestmark = pytest.mark.integration

# The package re-exports the function prepare(), which shadows the submodule as an attribute.
prepare_module = importlib.import_module("kubetune_trainer.data.prepare")
worker_module = importlib.import_module("kubetune_trainer.data.worker")  # where every block is read

RECORDS = [{"text": f"record {i}: " + "lorem ipsum " * (i % 5)} for i in range(100)]


def _cfg(make_cfg, uri, name="job", **pre):
    return make_cfg(
        {"train": uri, "format": "completion", "preprocessing": {"packing": False, "maxSeqLength": 32, **pre}},
        name=name,
    )


def test_shards_equal_sized_and_deterministic(tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    p = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=3, client=s3)
    assert len(p.train_shards) == 3 and p.rows_per_shard == 33 and p.dropped_sequences == 1
    assert p.num_train_sequences == p.stats["sequences"] == 99
    shards = [load_shard([u], client=s3) for u in p.train_shards]
    assert [len(s["input_ids"]) for s in shards] == [33, 33, 33]
    # What a training rank does: stream the shard into local memory maps (one row group in memory at a time).
    streamed = open_shard(p.train_shards[:2], client=s3)
    assert all(isinstance(v, np.memmap) for v in streamed.values())
    for k in shards[0]:
        assert np.array_equal(streamed[k], np.concatenate([shards[0][k], shards[1][k]]))
    assert all(s["input_ids"].shape[1] == p.seq_length for s in shards)
    assert p.stats["tokens"] == sum(int(s["attention_mask"].sum()) for s in shards)
    # Every kept row appears once; shards are disjoint.
    rows = {tuple(r) for s in shards for r in s["input_ids"]}
    assert len(rows) == 99

    # The same inputs under another run prefix give byte-identical shards.
    q = prepare(_cfg(make_cfg, uri, name="again"), tokenizer, num_shards=3, client=s3)
    assert q.fingerprint == p.fingerprint and q.train_shards != p.train_shards
    for a, b in zip(p.train_shards, q.train_shards):
        x, y = load_shard([a], client=s3), load_shard([b], client=s3)
        assert all(np.array_equal(x[k], y[k]) for k in x)

    # Another worker count is another preparation.
    r = prepare(_cfg(make_cfg, uri), tokenizer, num_shards=4, client=s3)
    assert r.fingerprint != p.fingerprint and r.rows_per_shard == 25 and r.dropped_sequences == 0


def test_completed_preparation_is_reused_without_reading(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    cfg = _cfg(make_cfg, uri)
    p = prepare(cfg, tokenizer, num_shards=2, client=s3)
    before = {o["key"]: o["etag"] for o in list_objects(s3, p.manifest_uri.rsplit("/", 1)[0])}

    def no_reading(*a, **k):
        raise AssertionError("a completed preparation must not read the data again")

    monkeypatch.setattr(worker_module, "read_records", no_reading)
    monkeypatch.setattr(worker_module, "read_jsonl_range", no_reading)
    again = prepare(cfg, tokenizer, num_shards=2, client=s3)
    assert again == p
    after = {o["key"]: o["etag"] for o in list_objects(s3, p.manifest_uri.rsplit("/", 1)[0])}
    assert after == before

    # Changed data (a new ETag) is a new fingerprint, prepared afresh.
    monkeypatch.undo()
    put(f"{prefix}/d.jsonl", RECORDS[:50])
    changed = prepare(cfg, tokenizer, num_shards=2, client=s3)
    assert changed.fingerprint != p.fingerprint and changed.stats["records"] == 50


def test_half_written_preparation_is_redone(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    uri = put(f"{prefix}/d.jsonl", RECORDS)
    cfg = _cfg(make_cfg, uri)
    real_write = prepare_module.write_shard
    calls = []

    def crash_after_first(*args, **kwargs):
        if calls:
            raise RuntimeError("worker killed")
        calls.append(1)
        return real_write(*args, **kwargs)

    monkeypatch.setattr(prepare_module, "write_shard", crash_after_first)
    with pytest.raises(RuntimeError, match="worker killed"):
        prepare(cfg, tokenizer, num_shards=2, client=s3)
    monkeypatch.undo()
    out_prefix = f"s3://kubetune-test/{prefix}/out/default/job/prepared"
    leftovers = [o["key"] for o in list_objects(s3, out_prefix)]
    assert len(leftovers) == 1 and leftovers[0].endswith("train/part-00000.parquet")
    # A stray object from the dead attempt must not survive into the finished output either.
    stray = leftovers[0].replace("part-00000", "part-00009")
    s3.put_object(Bucket="kubetune-test", Key=stray, Body=b"garbage")

    p = prepare(cfg, tokenizer, num_shards=2, client=s3)
    listed = s3.list_objects_v2(Bucket="kubetune-test", Prefix=parse_uri(out_prefix)[1] + "/")["Contents"]
    keys = sorted(o["Key"].split(f"/{p.fingerprint}/", 1)[1] for o in listed)
    assert keys == ["_COMPLETE", "manifest.json", "stats.json", "train/part-00000.parquet", "train/part-00001.parquet"]
    assert sum(len(load_shard([u], client=s3)["input_ids"]) for u in p.train_shards) == 100


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
