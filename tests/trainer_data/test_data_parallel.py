"""Preparation in parallel (Ray actors, JSONL cut into byte ranges) gives exactly what one process gives: the
same records, counts per reason with the same first locations, the same duplicates, split and shards."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import numpy as np
import psutil
import pytest
from test_data_quality import BAD_CHAT_LINES, GOOD, _expected, chat

from kubetune_trainer.data import load_shard, prepare

pytestmark = pytest.mark.integration

prepare_module = importlib.import_module("kubetune_trainer.data.prepare")
executors_module = importlib.import_module("kubetune_trainer.data.executors")
cache_module = importlib.import_module("kubetune_trainer.data.cache")


def _uncached(monkeypatch: pytest.MonkeyPatch) -> None:
    """From here on, prepare afresh and keep the output to itself (neither read nor publish the cache), so
    that a second preparation of the same input is really computed."""
    monkeypatch.setattr(cache_module, "lookup", lambda *a: None)
    monkeypatch.setattr(cache_module, "publish", lambda client, root, fp, manifest_uri: manifest_uri)


FILLER = [chat(f"Filler question {i} about topic {i % 7}?", f"Filler answer {i}. " * (1 + i % 3)) for i in range(300)]


def _mixture(put: Any, prefix: str, make_cfg: Any, name: str) -> tuple[Any, str]:
    """Source 0: chat JSONL (bad lines after 300 good ones, so past the first byte range; duplicates; a gzip
    file; hidden files that must not be read); source 1: instruction Parquet; held-out split; near-dedup."""
    a = put(f"{prefix}/chats/a.jsonl", FILLER + [line for line, _ in BAD_CHAT_LINES] + FILLER[:20])
    put(f"{prefix}/chats/b.jsonl.gz", [chat(f"Zipped {i}?", f"Yes {i}.") for i in range(40)] + GOOD[:5], "jsonl.gz")
    put(f"{prefix}/chats/_SUCCESS", b"not data", "raw")
    put(f"{prefix}/chats/.part-0.crc", b"\x00\x01 not data", "raw")
    faq = [{"question": f"How do I do thing {i}?", "answer": f"Like this: step {i}."} for i in range(200)]
    put(f"{prefix}/faq.parquet", faq, "parquet")
    dataset = {
        "format": "chat",
        "sources": [
            {"uri": f"s3://kubetune-test/{prefix}/chats/", "weight": 3},
            {
                "uri": f"s3://kubetune-test/{prefix}/faq.parquet",
                "weight": 1,
                "format": "instruction",
                "fields": {"prompt": "question", "response": "answer"},
            },
        ],
        "validationSplit": 0.1,
        "preprocessing": {"maxSeqLength": 96, "maxInvalidFraction": 0.3, "nearDuplicateThreshold": 0.95},
    }
    return make_cfg(dataset, name=name), a


def _same(p: Any, q: Any, s3: Any) -> None:
    assert p.fingerprint == q.fingerprint and p.manifest_uri != q.manifest_uri  # two preparations
    assert p.stats == q.stats and p.invalid_samples == q.invalid_samples
    assert (p.rows_per_shard, p.seq_length, p.num_validation_sequences) == (
        q.rows_per_shard,
        q.seq_length,
        q.num_validation_sequences,
    )
    for a, b in zip(p.train_shards + p.validation_shards, q.train_shards + q.validation_shards, strict=True):
        x, y = load_shard([a], client=s3), load_shard([b], client=s3)
        assert x.keys() == y.keys() and all(np.array_equal(x[k], y[k]) for k in x)


def _check_counts(p: Any, a_uri: str) -> None:
    counts, first = _expected()
    assert p.stats["invalidByReason"] == dict(sorted(counts.items()))
    # Locations count lines over the whole file, whichever byte range a line was read in.
    assert p.invalid_samples == {r: f"{a_uri} line {len(FILLER) + n}" for r, n in first.items()}
    assert p.stats["duplicatesRemoved"] >= 20 + 5  # FILLER[:20] again, GOOD[:5] again
    assert (
        p.stats["validationRecords"] > 0
        and sum(p.stats["sourceRecords"])
        == p.stats["trainRecords"] + p.stats["validationRecords"] + p.stats["duplicatesRemoved"]
    )


def test_byte_ranges_and_units_give_the_same_output_in_one_process(tokenizer, s3, put, prefix, make_cfg, monkeypatch):
    """No Ray: the JSONL cut into 2 KB ranges and packed in units of 64 examples equals one block per file."""
    monkeypatch.setattr(prepare_module, "UNIT_EXAMPLES", 64)
    cfg, a_uri = _mixture(put, prefix, make_cfg, "whole")
    whole = prepare(cfg, tokenizer, num_shards=2, client=s3)
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 2048)
    _uncached(monkeypatch)
    ranged = prepare(_mixture(put, prefix, make_cfg, "ranged")[0], tokenizer, num_shards=2, client=s3)
    _check_counts(whole, a_uri)
    _same(whole, ranged, s3)


@pytest.fixture
def local_ray(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A two-CPU local Ray whose workers have the S3 credentials in their environment (as worker pods do)."""
    import ray

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)
    yield ray
    ray.shutdown()


def _actor_processes() -> list[psutil.Process]:
    """The preparation's Ray actors (Ray titles a worker process after the actor class it hosts)."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = proc.info["cmdline"] or []
        if cmdline and cmdline[0].startswith("ray::PrepareActor"):
            found.append(proc)
    return found


def test_ray_actors_give_the_same_output_as_one_process(tokenizer, s3, put, prefix, make_cfg, monkeypatch, local_ray):
    """Two Ray actors, 2 KB byte ranges, units of 64 examples: equal to the one-process path on the same input.

    The fault: once every unit is packed, and before the shards are cut and written, every actor process is
    killed (SIGKILL, as the OOM killer does). What is lost: the actors' processes, which Ray starts again (each
    loads the tokenizer anew). What is kept: the packed rows, which Ray's object store holds for the driver, not
    the actor; the cut and write tasks are retried on the new processes, and the output is still the
    one-process output, row for row."""
    monkeypatch.setattr(prepare_module, "UNIT_EXAMPLES", 64)
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_BYTES", 0)  # tiny data: Ray all the same
    cfg, a_uri = _mixture(put, prefix, make_cfg, "inline")
    inline = prepare(cfg, tokenizer, num_shards=2, client=s3)
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 2048)
    _uncached(monkeypatch)
    killed: list[int] = []
    real_write = executors_module.RayExecutor.write

    def kill_actors_then_write(self: Any, split: str, *args: Any) -> Any:
        if split == "train":
            for proc in _actor_processes():
                proc.kill()
                killed.append(proc.pid)
        return real_write(self, split, *args)

    monkeypatch.setattr(executors_module.RayExecutor, "write", kill_actors_then_write)
    parallel = prepare(_mixture(put, prefix, make_cfg, "ray")[0], tokenizer, num_shards=2, client=s3, parallelism=2)
    assert len(killed) == 2  # both actors died between packing and writing...
    _check_counts(parallel, a_uri)
    _same(inline, parallel, s3)  # ...and the shards are the same all the same
    # The actors are gone once the preparation is done: nothing holds CPUs the training workers need.
    deadline = time.monotonic() + 60
    while local_ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert local_ray.available_resources().get("CPU") == 2
