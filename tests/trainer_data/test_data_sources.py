"""JSON array files, Alpaca's field layout, unreadable files named by what they hold, and weighted mixtures of
several sources, all through prepare() against the real S3 server and the SmolLM2 tokenizer."""

from __future__ import annotations

import gzip
import json

import pytest
from data_test_helpers import examples_of, parquet_bytes, targets_text

from kubetune_trainer.data import DataError, load_shard, prepare

pytestmark = pytest.mark.integration

# Alpaca's layout: instruction, optional input, output; a JSON array, pretty-printed as people save it.
ALPACA = [
    {
        "instruction": f"Add one to {i}.",
        "input": (f"Show the working for {i}." if i % 3 == 0 else ""),
        "output": f"{i} plus one is {i + 1}.",
    }
    for i in range(40)
]
ALPACA_FIELDS = {"prompt": "instruction", "input": "input", "response": "output"}


def _all(s3, p):
    return examples_of(load_shard(p.train_shards + p.validation_shards, client=s3))


def test_alpaca_json_array_trains_with_the_right_counts(tokenizer, s3, put, prefix, make_cfg):
    body = json.dumps(ALPACA + [["not", "an", "object"]], indent=2).encode()
    uri = put(f"{prefix}/alpaca/alpaca_data.json", body, "raw")
    cfg = make_cfg(
        {
            "train": uri,
            "format": "instruction",
            "fields": ALPACA_FIELDS,
            "validationSplit": 0.2,
            "preprocessing": {"maxSeqLength": 96, "packing": False},
        }
    )
    p = prepare(cfg, tokenizer, num_shards=2, client=s3)
    s = p.stats
    assert s["records"] == 41 and s["invalidRecords"] == 1 and s["invalidByReason"] == {"not_an_object": 1}
    assert s["trainRecords"] + s["validationRecords"] == 40 and s["validationRecords"] > 0
    assert p.invalid_samples["not_an_object"] == f"{uri} element 41"
    examples = _all(s3, p)
    assert len(examples) == p.num_train_sequences + p.num_validation_sequences
    texts = [tokenizer.decode([int(t) for t in ids]) for ids, _ in examples]
    with_input = [t for t in texts if "Show the working for" in t]
    # Alpaca's input follows the instruction in the user turn; only the output is learned.
    assert with_input and all("Add one to" in t.split("Show the working for")[0] for t in with_input)
    for ids, labels in examples:
        target = targets_text(tokenizer, ids, labels)
        assert "plus one is" in target and "Add one to" not in target and "Show the working" not in target


def test_json_array_gzipped_and_configured(tokenizer, s3, put, prefix, make_cfg):
    body = gzip.compress(json.dumps([{"text": f"Line {i} of a gzipped array."} for i in range(9)]).encode())
    uri = put(f"{prefix}/gz/data.json.gz", body, "raw")
    p = prepare(make_cfg({"train": uri, "format": "completion"}), tokenizer, num_shards=1, client=s3)
    assert p.stats["records"] == 9 and p.stats["trainRecords"] == 9
    # fileFormat json on a file without the .json extension
    uri = put(f"{prefix}/named/data.txt", json.dumps([{"text": "one"}, {"text": "two"}]).encode(), "raw")
    p = prepare(make_cfg({"train": uri, "format": "completion", "fileFormat": "json"}), tokenizer, 1, client=s3)
    assert p.stats["records"] == 2


@pytest.mark.parametrize(
    "body,name,found",
    [
        (
            b"<html><head><title>403 Forbidden</title>",
            "page.jsonl",
            "starts with '<html><head>' — not JSONL, a JSON array or Parquet",
        ),
        (b"PK\x03\x04\x14\x00\x00\x00", "data.json", "starts with a zip archive's signature"),
        (b"text,label\nhello,1\n", "data.csv", "starts with 'text,label\\\\nh' — not JSONL"),
        (b'[{"text": "a"}, {"text": "b"', "data.json", "element 2 is not valid JSON"),
        (b'{"text": "a"}', "data.bin", None),  # JSONL under an unknown extension: sniffed and read
    ],
)
def test_unreadable_file_names_what_it_found(body, name, found, tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/odd/{name}", body, "raw")
    cfg = make_cfg({"train": uri, "format": "completion"})
    if found is None:
        assert prepare(cfg, tokenizer, num_shards=1, client=s3).stats["records"] == 1
        return
    with pytest.raises(DataError, match=found.replace("(", r"\(").replace(")", r"\)")) as err:
        prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert uri in str(err.value)


def test_parquet_under_a_json_name_is_read_as_parquet(tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/pq/data.json", parquet_bytes([{"text": f"row {i}"} for i in range(5)]), "raw")
    p = prepare(make_cfg({"train": uri, "format": "completion"}), tokenizer, num_shards=1, client=s3)
    assert p.stats["records"] == 5


CHAT_A = [
    {
        "messages": [
            {"role": "user", "content": f"Chat question {i}?"},
            {"role": "assistant", "content": f"Chat answer {i}."},
        ]
    }
    for i in range(400)
]
INSTR_B = [{"question": f"Instruction number {i}.", "answer": f"Instruction reply {i}."} for i in range(60)]


def test_mixture_of_chat_jsonl_and_instruction_parquet_by_weight(tokenizer, s3, put, prefix, make_cfg):
    """3:1 over a chat JSONL source and a Parquet instruction source with its own field names: the kept
    examples, and the prepared rows, are within a few percent of 3:1, and reading stops when the smaller
    source runs out."""
    a = put(f"{prefix}/mix/chat.jsonl", CHAT_A[:300] + ["not json"] + CHAT_A[300:])
    b = put(f"{prefix}/mix/instr.parquet", INSTR_B, "parquet")
    cfg = make_cfg(
        {
            "format": "chat",
            "sources": [
                {"uri": a, "weight": 3},
                {
                    "uri": b,
                    "weight": 1,
                    "format": "instruction",
                    "fields": {"prompt": "question", "response": "answer"},
                },
            ],
            "preprocessing": {"maxSeqLength": 64, "packing": False},
        }
    )
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    kept = p.stats["sourceRecords"]
    assert kept[1] == 60  # the smaller source, read to its end
    assert abs(kept[0] / kept[1] - 3.0) <= 0.05 * 3.0, kept
    texts = [tokenizer.decode([int(t) for t in ids]) for ids, _ in _all(s3, p)]
    n_a = sum("Chat question" in t for t in texts)
    n_b = sum("Instruction number" in t for t in texts)
    assert n_a + n_b == len(texts) == p.num_train_sequences
    assert abs(n_a / n_b - 3.0) <= 0.05 * 3.0, (n_a, n_b)


def test_single_source_form_equals_train(tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/one/chat.jsonl", CHAT_A[:20])
    one = prepare(make_cfg({"format": "chat", "sources": [{"uri": uri}]}), tokenizer, 1, client=s3)
    plain = prepare(make_cfg({"format": "chat", "train": uri}), tokenizer, 1, client=s3)
    assert one.stats == plain.stats and "sourceRecords" not in one.stats
