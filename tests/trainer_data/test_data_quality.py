"""Invalid records by reason with sample lines, the invalid threshold, dedup, length filters and the split."""

from __future__ import annotations

import json

import pytest
from data_test_helpers import examples_of

from kubetune_trainer.data import DataError, load_shard, prepare
from kubetune_trainer.data.dedup import shingles

pytestmark = pytest.mark.integration


def chat(q: str, a: str) -> dict:
    return {"messages": [{"role": "user", "content": q}, {"role": "assistant", "content": a}]}


GOOD = [chat(f"Question {i}?", f"Answer {i}.") for i in range(41)]

# (line content, reason) in file order; None marks a good line. Line numbers are 1-based.
BAD_CHAT_LINES: list[tuple[object, str | None]] = (
    [
        (GOOD[0], None),  # 1
        ('{"messages": [', "bad_json"),  # 2
        (b'\xff\xfe{"messages": []}', "bad_encoding"),  # 3
        ("[1, 2]", "not_an_object"),  # 4
        ({"other": 1}, "missing_field"),  # 5
        ({"messages": "hello"}, "wrong_type"),  # 6
        ({"messages": [{"role": "user", "content": 5}]}, "wrong_type"),  # 7
        ({"messages": [{"role": "user", "content": "  "}, {"role": "assistant", "content": ""}]}, "empty_text"),  # 8
        ({"messages": [{"role": "robot", "content": "beep"}]}, "unknown_role"),  # 9
        ({"messages": [{"role": "user", "content": "hi"}]}, "no_assistant_turn"),  # 10
        (chat("a<|im_end|>b", "c"), "control_token"),  # 11
        ("", None),  # 12 blank: not a record
        ({"messages": [{"role": "user"}, {"role": "assistant", "content": "x"}]}, "missing_field"),  # 13
        ("not json at all", "bad_json"),  # 14
        ('"a JSON string"', "not_an_object"),  # 15
        ({"messages": [["user", "hi"]]}, "wrong_type"),  # 16
        (chat("half of a surrogate pair \ud800", "a"), "bad_encoding"),  # 17: valid JSON, no valid UTF-8
    ]
    + [(g, None) for g in GOOD[1:]]
)


def _expected() -> tuple[dict[str, int], dict[str, int]]:
    counts: dict[str, int] = {}
    first: dict[str, int] = {}
    for lineno, (_, reason) in enumerate(BAD_CHAT_LINES, start=1):
        if reason:
            counts[reason] = counts.get(reason, 0) + 1
            first.setdefault(reason, lineno)
    return counts, first


def test_every_invalid_kind_counted_with_sample_line(tokenizer, s3, put, prefix, make_cfg):
    uri = put(f"{prefix}/bad/chat.jsonl", [line for line, _ in BAD_CHAT_LINES])
    counts, first = _expected()
    assert len(counts) == 9
    cfg = make_cfg({"train": uri, "format": "chat", "preprocessing": {"maxSeqLength": 64, "maxInvalidFraction": 0.3}})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    invalid = sum(counts.values())
    assert p.stats["invalidByReason"] == counts
    assert p.stats["invalidRecords"] == invalid == 15
    assert p.stats["records"] == len(BAD_CHAT_LINES) - 1  # the blank line is not a record
    assert p.stats["trainRecords"] == len(GOOD)
    assert p.invalid_samples == {r: f"{uri} line {n}" for r, n in first.items()}
    # What the trainer reports lands in the status as DataStats: the keys must be its wire names.
    from kubetune.api import DataStats

    assert DataStats.model_validate(p.stats).wire() == p.stats


def test_over_threshold_fails_naming_reason_and_line(tokenizer, s3, put, prefix, make_cfg):
    counts, first = _expected()
    uri = put(f"{prefix}/bad/chat.jsonl", [line for line, _ in BAD_CHAT_LINES])
    cfg = make_cfg({"train": uri, "format": "chat", "preprocessing": {"maxSeqLength": 64, "maxInvalidFraction": 0.1}})
    with pytest.raises(DataError) as e:
        prepare(cfg, tokenizer, num_shards=1, client=s3)
    msg = str(e.value)
    assert "15 of 56 records (26.8%) are invalid" in msg and "maxInvalidFraction 10.0%" in msg
    for reason, n in counts.items():
        assert f"{reason}: {n} (" in msg and f"first at {uri} line {first[reason]}" in msg
    # Most frequent first (wrong_type, 3), ties by name.
    assert msg.index("wrong_type: 3") < msg.index("bad_json: 2") < msg.index("missing_field: 2")
    # Nothing was marked complete: a fixed file is prepared from scratch.
    listed = s3.list_objects_v2(Bucket="kubetune-test", Prefix=f"{prefix}/out").get("Contents", [])
    assert not [o for o in listed if o["Key"].endswith("_COMPLETE")]


def test_single_reason_over_threshold(tokenizer, s3, put, prefix, make_cfg):
    lines = [{"text": f"fine line {i}"} for i in range(7)]
    lines[1:1] = ["{broken", "{broken", "{broken"]  # lines 2-4
    uri = put(f"{prefix}/c.jsonl", lines)
    cfg = make_cfg({"train": uri, "format": "completion", "preprocessing": {"maxInvalidFraction": 0.25}})
    with pytest.raises(DataError, match=r"3 of 10 records .*bad_json: 3 .*first at s3://\S+/c\.jsonl line 2"):
        prepare(cfg, tokenizer, num_shards=1, client=s3)


def test_invalid_classification_and_instruction_records(tokenizer, s3, put, prefix, make_cfg):
    cls = [{"text": f"t{i}", "label": "a" if i % 2 else "b"} for i in range(20)]
    cls += [
        {"text": "x", "label": "c"},  # unknown_label (name not configured)
        {"text": "x", "label": 7},  # unknown_label (id out of range)
        {"text": "x", "label": True},  # wrong_type (bool is not a class id)
        {"text": "x", "label": 1.0},  # wrong_type
        {"text": "x"},  # missing_field
        {"text": "", "label": "a"},  # empty_text
        {"text": 3, "label": "a"},
    ]  # wrong_type
    uri = put(f"{prefix}/cls.jsonl", cls)
    cfg = make_cfg(
        {"train": uri, "format": "classification", "labels": ["a", "b"], "preprocessing": {"maxInvalidFraction": 0.5}},
        model={"task": "sequence-classification", "numLabels": 2},
    )
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["invalidByReason"] == {"unknown_label": 2, "wrong_type": 3, "missing_field": 1, "empty_text": 1}
    assert p.invalid_samples["unknown_label"].endswith("cls.jsonl line 21")

    ins = [{"prompt": f"p{i}", "response": f"r{i}"} for i in range(10)]
    ins += [
        {"prompt": "p"},
        {"prompt": "p", "response": None},
        {"prompt": "p", "response": ["r"]},
        {"prompt": " ", "response": "r"},
        {"prompt": "p", "response": "r", "system": 1},
    ]
    # A Parquet column has one type, so absent or wrongly typed values arrive as nulls (missing_field).
    rows = [
        {"prompt": r.get("prompt"), "response": r.get("response") if isinstance(r.get("response"), str) else None}
        for r in ins
    ]
    uri = put(f"{prefix}/ins.parquet", rows, "parquet")
    cfg = make_cfg({"train": uri, "format": "instruction", "preprocessing": {"maxInvalidFraction": 0.5}})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    # Rows 11-13 have no response, row 14 an empty prompt.
    assert p.stats["invalidByReason"] == {"missing_field": 3, "empty_text": 1}
    assert p.invalid_samples["missing_field"].endswith("ins.parquet row 11")
    uri = put(f"{prefix}/ins.jsonl", ins)
    cfg = make_cfg({"train": uri, "format": "instruction", "preprocessing": {"maxInvalidFraction": 0.5}})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["invalidByReason"] == {"missing_field": 2, "wrong_type": 2, "empty_text": 1}


def test_exact_dedup_after_normalisation(tokenizer, s3, put, prefix, make_cfg):
    recs = [
        {"text": "Hello   world"},
        {"text": "Hello world"},
        {"text": " Hello world\t"},
        {"text": "hello world"},  # case differs: not a duplicate
        {"text": "\ufb01ne print"},
        {"text": "fine print"},  # NFKC folds the ligature
        {"text": "other"},
        {"text": "other"},
        {"text": "other"},
    ]
    uri = put(f"{prefix}/d.jsonl", recs)
    cfg = make_cfg({"train": uri, "format": "completion"})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["duplicatesRemoved"] == 5 and p.stats["trainRecords"] == 4

    cfg = make_cfg(
        {"train": uri, "format": "completion", "preprocessing": {"deduplicate": False, "unicodeNormalization": "none"}},
        name="nodedup",
    )
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["duplicatesRemoved"] == 0 and p.stats["trainRecords"] == 9


def _jaccard(a: str, b: str) -> float:
    sa, sb = set(shingles(a)), set(shingles(b))
    return len(sa & sb) / len(sa | sb)


def test_near_dedup_with_minhash_lsh(tokenizer, s3, put, prefix, make_cfg):
    bases = [
        "The committee will meet on Tuesday afternoon to review the annual budget and staffing plans.",
        "A heavy storm flooded the valley roads overnight, and crews worked until dawn to clear them.",
        "Photosynthesis converts light energy into chemical energy stored in glucose molecules.",
        "The library extended its opening hours during the exam period for all registered students.",
    ]
    variants = [
        "The committee will meet on Tuesday afternoon to review the annual budget and staffing plans!",
        "A heavy storm flooded the valley roads overnight, and crews worked until dawn to clear it.",
        "Photosynthesis converts light energy into chemical energy stored in glucose molecules today.",
    ]
    for v, b in zip(variants, bases):
        assert _jaccard(v, b) > 0.9  # far enough above the threshold that the MinHash estimate agrees
    for i, a in enumerate(bases):
        for b in bases[i + 1 :]:
            assert _jaccard(a, b) < 0.2
    uri = put(f"{prefix}/near.jsonl", [{"text": t} for t in bases + variants])
    cfg = make_cfg({"train": uri, "format": "completion", "preprocessing": {"nearDuplicateThreshold": 0.8}})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["duplicatesRemoved"] == 3 and p.stats["trainRecords"] == 4
    texts = {
        tokenizer.decode([int(t) for t in ids[:-1]]) for ids, _ in examples_of(load_shard(p.train_shards, client=s3))
    }
    assert texts == set(bases)  # the first of each group is the one kept


def test_length_filters(tokenizer, s3, put, prefix, make_cfg):
    lengths = [5, 10, 30, 50, 51, 100]
    recs = [{"text": (f"x{n} " * 100)[: n - 1] + "."} for n in lengths]
    assert [len(r["text"]) for r in recs] == lengths
    uri = put(f"{prefix}/len.jsonl", recs)
    cfg = make_cfg({"train": uri, "format": "completion", "preprocessing": {"minChars": 10, "maxChars": 50}})
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["filtered"] == 3 and p.stats["trainRecords"] == 3

    # Chat length is the sum of the turns' texts; a prompt that fills maxSeqLength leaves nothing to learn.
    recs = [chat("q" * 20, "a" * 20), chat("q" * 50, "a" * 20), chat(" ".join(["long"] * 200), "short")]
    uri = put(f"{prefix}/len-chat.jsonl", recs)
    cfg = make_cfg(
        {"train": uri, "format": "chat", "preprocessing": {"maxChars": 60, "maxSeqLength": 64}}, name="chatlen"
    )
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["filtered"] == 2 and p.stats["trainRecords"] == 1
    cfg = make_cfg({"train": uri, "format": "chat", "preprocessing": {"maxSeqLength": 64}}, name="chattrunc")
    p = prepare(cfg, tokenizer, num_shards=1, client=s3)
    assert p.stats["filtered"] == 1 and p.stats["trainRecords"] == 2


def test_validation_split_is_by_content_and_seed(tokenizer, s3, put, prefix, make_cfg):
    recs = [{"text": f"sentence number {i} about topic {i % 7}"} for i in range(200)]
    uri_a = put(f"{prefix}/a/data.jsonl", recs)
    uri_b = put(f"{prefix}/b/data.jsonl", list(reversed(recs)))  # same records, other order

    def held_out(uri: str, name: str, seed: int = 42) -> set[str]:
        cfg = make_cfg(
            {
                "train": uri,
                "format": "completion",
                "validationSplit": 0.25,
                "preprocessing": {"packing": False, "maxSeqLength": 32},
            },
            training={"seed": seed},
            name=name,
        )
        p = prepare(cfg, tokenizer, num_shards=2, client=s3)
        assert p.stats["trainRecords"] + p.stats["validationRecords"] == 200
        arrays = load_shard(p.validation_shards, client=s3)
        assert len(p.validation_shards) == 2
        return {
            tokenizer.decode([int(t) for t, m in zip(ids, mask) if m][:-1])
            for ids, mask in zip(arrays["input_ids"], arrays["attention_mask"])
        }

    a = held_out(uri_a, "a")
    assert 30 <= len(a) <= 70
    assert held_out(uri_b, "b") == a
    assert held_out(uri_a, "c", seed=7) != a


def test_separate_validation_uri_drops_overlap_with_train(tokenizer, s3, put, prefix, make_cfg):
    train = [{"text": f"train text {i}"} for i in range(20)]
    val = [{"text": f"validation text {i}"} for i in range(6)] + [{"text": "train text 3"}]
    t_uri = put(f"{prefix}/train.jsonl", train)
    v_uri = put(f"{prefix}/val.parquet", val, "parquet")
    cfg = make_cfg(
        {
            "train": t_uri,
            "validation": v_uri,
            "format": "completion",
            "preprocessing": {"packing": False, "maxSeqLength": 16},
        }
    )
    p = prepare(cfg, tokenizer, num_shards=3, client=s3)
    assert p.stats["records"] == 27
    assert p.stats["validationRecords"] == 6 and p.stats["duplicatesRemoved"] == 1
    assert p.num_validation_sequences == 6 and len(p.validation_shards) == 3
    sizes = [len(load_shard([u], client=s3)["input_ids"]) for u in p.validation_shards]
    assert sizes == [2, 2, 2]
    assert (
        json.loads(s3.get_object(Bucket="kubetune-test", Key=p.manifest_uri.split("/", 3)[3])["Body"].read())[
            "fingerprint"
        ]
        == p.fingerprint
    )
