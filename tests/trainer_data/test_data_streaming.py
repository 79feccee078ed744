"""Streaming: a data file much larger than the memory preprocessing may use goes through with bounded memory."""

from __future__ import annotations

import json
import os
import random
import time
import tracemalloc

import pytest

from kubetune_trainer.data import prepare

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Words that SmolLM2's tokenizer keeps as one token each: many bytes per token, so the file is large while
# tokenising it stays affordable on a shared 2-core machine.
WORDS = [
    "international",
    "communication",
    "development",
    "information",
    "government",
    "university",
    "environment",
    "management",
    "performance",
    "relationship",
    "technology",
    "especially",
    "particularly",
    "organization",
    "significant",
    "understanding",
    "experience",
    "community",
    "political",
    "president",
    "increasingly",
]
FILE_BYTES = 16 << 20


def _write_big_jsonl(path: str) -> int:
    rng = random.Random(0)
    n = 0
    with open(path, "w") as f:
        while f.tell() < FILE_BYTES:
            f.write(json.dumps({"text": f"{n} " + " ".join(rng.choice(WORDS) for _ in range(120))}) + "\n")
            n += 1
    return n


def test_big_file_streams_with_bounded_memory(tokenizer, s3, put, prefix, make_cfg, tmp_path):
    path = str(tmp_path / "big.jsonl")
    n = _write_big_jsonl(path)
    size = os.path.getsize(path)
    s3.upload_file(path, "kubetune-test", f"{prefix}/big/data.jsonl")
    os.remove(path)
    # Warm up first, so imports and the tokenizer's lazy state do not count as data-proportional memory.
    put(f"{prefix}/warm/data.jsonl", [{"text": "warm up"}])
    prepare(
        make_cfg({"train": f"s3://kubetune-test/{prefix}/warm", "format": "completion"}, name="warm"),
        tokenizer,
        num_shards=1,
        client=s3,
    )

    cfg = make_cfg(
        {
            "train": f"s3://kubetune-test/{prefix}/big",
            "format": "completion",
            "validationSplit": 0.05,
            "preprocessing": {"maxSeqLength": 512},
        }
    )
    tracemalloc.start()
    try:
        base = tracemalloc.get_traced_memory()[0]
        t0 = time.monotonic()
        p = prepare(cfg, tokenizer, num_shards=2, client=s3)
        seconds = time.monotonic() - t0
        peak = tracemalloc.get_traced_memory()[1] - base
    finally:
        tracemalloc.stop()
    print(f"{size / 1e6:.1f} MB, {n} records in {seconds:.1f} s, traced peak {peak / 1e6:.2f} MB")
    assert p.stats["records"] == n and p.stats["invalidRecords"] == 0
    assert p.stats["trainRecords"] + p.stats["validationRecords"] == n
    # The raw text never sits in memory: peak Python allocations stay far below the file's size (what
    # remains is one tokenizer batch, one block of rows, the dedup hashes and one upload buffer).
    assert peak < size / 4, f"peak {peak / 1e6:.1f} MB for a {size / 1e6:.1f} MB file"
