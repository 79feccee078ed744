"""Preparation in parallel (Ray actors, JSONL cut into byte ranges) gives exactly what one process gives: the
same records, counts per reason with the same first locations, the same duplicates, split and shards, also
when a node is lost half-way."""

from __future__ import annotations

import importlib
import logging
import time
from typing import Any

import numpy as np
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
def ray_nodes(s3_server: Any, monkeypatch: pytest.MonkeyPatch) -> Any:
    """A local Ray cluster of a head without CPUs (as KubeRay's) and two worker nodes of one CPU each: separate
    raylets with object stores of their own, which a test can remove as a node drain removes a pod."""
    import ray
    from ray.cluster_utils import Cluster

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", s3_server.access_key)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", s3_server.secret_key)
    # A lost node is noticed after 3 s rather than Ray's default 15 s (health checks every 3 s, 5 missed); not
    # sooner, so that a live node busy importing transformers on a loaded machine is not taken for dead.
    health = {"health_check_period_ms": 500, "health_check_failure_threshold": 6}
    cluster = Cluster(
        initialize_head=True, head_node_args={"num_cpus": 0, "include_dashboard": False, "_system_config": health}
    )
    nodes = [cluster.add_node(num_cpus=1) for _ in range(2)]
    ray.init(address=cluster.address, logging_level=logging.WARNING)
    yield cluster, nodes
    ray.shutdown()
    cluster.shutdown()


def test_ray_actors_give_the_same_output_as_one_process_though_a_node_is_lost(
    tokenizer, s3, put, prefix, make_cfg, monkeypatch, ray_nodes
):
    """Two Ray actors on two worker nodes, 2 KB byte ranges, units of 64 examples: equal to the one-process path
    on the same input, though a node is lost on the way.

    The fault: once every unit is packed, and before the shards are cut and written, one worker node is removed
    at once (its raylet, its object store with the rows its actor packed, and the actor), and a new node joins,
    as a drained pod is replaced. What is lost: that node's packed rows and its actor. What is recovered: Ray
    starts the actor again on a live node and rebuilds the lost rows from their lineage (the blocks are parsed
    and the units packed again); the cut and write tasks wait for it. The shards are the one-process shards,
    row for row."""
    import ray

    cluster, nodes = ray_nodes
    monkeypatch.setattr(prepare_module, "UNIT_EXAMPLES", 64)
    monkeypatch.setattr(prepare_module, "PARALLEL_MIN_BYTES", 0)  # tiny data: Ray all the same
    cfg, a_uri = _mixture(put, prefix, make_cfg, "inline")
    inline = prepare(cfg, tokenizer, num_shards=2, client=s3)
    monkeypatch.setattr(prepare_module, "BLOCK_BYTES", 2048)
    _uncached(monkeypatch)
    lost: list[Any] = []
    real_write = executors_module.RayExecutor.write

    def drain_a_node_then_write(self: Any, split: str, *args: Any) -> Any:
        if split == "train":
            refs = [rows for _, rows, _ in self.units["train"]]
            where = ray.experimental.get_object_locations(refs)
            lost.extend(r for r in refs if where[r]["node_ids"] == [nodes[0].node_id])
            cluster.remove_node(nodes[0], allow_graceful=False)
            cluster.add_node(num_cpus=1)
        return real_write(self, split, *args)

    monkeypatch.setattr(executors_module.RayExecutor, "write", drain_a_node_then_write)
    parallel = prepare(_mixture(put, prefix, make_cfg, "ray")[0], tokenizer, num_shards=2, client=s3, parallelism=2)
    assert lost  # packed rows that lived only on the removed node...
    _check_counts(parallel, a_uri)
    _same(inline, parallel, s3)  # ...were rebuilt: the shards are the one-process shards
    # The actors are gone once the preparation is done: nothing holds CPUs the training workers need.
    deadline = time.monotonic() + 60
    while ray.available_resources().get("CPU") != 2 and time.monotonic() < deadline:
        time.sleep(0.5)
    assert ray.available_resources().get("CPU") == 2
