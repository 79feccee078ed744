"""Pure parts of the data side: normalisation, record validation, masking, packing, dedup sets, fingerprints."""

from __future__ import annotations

import copy
import random

import numpy as np
import pytest

from kubetune import chat_templates
from kubetune.api import DatasetSpec, parse_spec, resolve_trainer_config
from kubetune_trainer.data import DataError
from kubetune_trainer.data.dedup import HashSet64, NearDedup
from kubetune_trainer.data.encode import IGNORE, Encoded, Encoder
from kubetune_trainer.data.fingerprint import fingerprint, tokenizer_identity
from kubetune_trainer.data.invalid import REASONS, InvalidTally
from kubetune_trainer.data.normalize import normalize_text
from kubetune_trainer.data.packing import Packer, spill_columns
from kubetune_trainer.data.records import Example, RecordRules, parse_record
from kubetune_trainer.data.s3 import parse_uri
from kubetune_trainer.data.spill import RowSpill

pytestmark = pytest.mark.unit


@pytest.mark.parametrize(
    "raw,form,expected",
    [
        ("  a   b\tc  ", "NFKC", "a b c"),
        ("line one  \r\nline two\r\n\r\n\r\n\r\nlast", "NFKC", "line one\nline two\n\nlast"),
        ("def f():\n    return  1\n", "NFKC", "def f():\n    return 1"),  # indentation kept, inner run collapsed
        ("\ufb01ne\u00a0print", "NFKC", "fine print"),
        ("\ufb01ne", "NFC", "\ufb01ne"),
        ("e\u0301", "NFC", "\u00e9"),
        ("e\u0301  x", "none", "e\u0301 x"),
    ],
)
def test_normalize_text(raw, form, expected):
    assert normalize_text(raw, form, True) == expected


def test_normalize_without_whitespace_cleanup_keeps_spacing():
    assert normalize_text("  a   b ", "NFKC", False) == "  a   b "


def _rules(**dataset) -> RecordRules:
    ds = DatasetSpec.model_validate({"train": "s3://bucket/x", **dataset})
    return RecordRules.from_spec(ds, None)


@pytest.mark.parametrize(
    "fmt,value,expected",
    [
        ("completion", {"text": "hi"}, None),
        ("completion", {}, "missing_field"),
        ("completion", {"text": None}, "missing_field"),
        ("completion", {"text": 3}, "wrong_type"),
        ("completion", {"text": " \t "}, "empty_text"),
        ("instruction", {"prompt": "p", "response": "r"}, None),
        ("instruction", {"prompt": "p", "response": "r", "system": None}, None),
        ("instruction", {"prompt": "", "response": 5}, "wrong_type"),  # type before emptiness, whatever the order
        ("instruction", {"prompt": "", "response": "r"}, "empty_text"),
        ("instruction", {"response": "r", "system": 1}, "missing_field"),
        ("chat", {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]}, None),
        ("chat", {"messages": {"role": "user"}}, "wrong_type"),
        ("chat", {"messages": ["user: hi"]}, "wrong_type"),
        ("chat", {"messages": [{"role": "user"}]}, "missing_field"),
        ("chat", {"messages": [{"role": "tool", "content": "x"}]}, "unknown_role"),
        ("chat", {"messages": []}, "empty_text"),
        (
            "chat",
            {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": " "}]},
            "no_assistant_turn",
        ),
    ],
)
def test_parse_record_reasons(fmt, value, expected):
    out = parse_record(value, _rules(format=fmt))
    if expected is None:
        assert isinstance(out, Example)
    else:
        assert out == expected and out in REASONS


def test_parse_classification_labels():
    rules = RecordRules.from_spec(
        DatasetSpec.model_validate({"train": "s3://bucket/x", "format": "classification", "labels": ["neg", "pos"]}), 2
    )
    assert parse_record({"text": "t", "label": "pos"}, rules).label == 1
    assert parse_record({"text": "t", "label": " neg "}, rules).label == 0
    assert parse_record({"text": "t", "label": 1}, rules).label == 1
    assert parse_record({"text": "t", "label": 2}, rules) == "unknown_label"
    assert parse_record({"text": "t", "label": -1}, rules) == "unknown_label"
    assert parse_record({"text": "t", "label": "maybe"}, rules) == "unknown_label"
    assert parse_record({"text": "t", "label": False}, rules) == "wrong_type"
    assert parse_record({"text": "", "label": "x"}, rules) == "empty_text"


def test_instruction_becomes_chat_and_lengths_count_text_only():
    ex = parse_record({"system": "S", "prompt": "P  p", "response": "R"}, _rules(format="instruction"))
    assert ex.messages == [("system", "S"), ("user", "P p"), ("assistant", "R")]
    assert ex.chars == 5


def test_invalid_tally_message_and_threshold():
    t = InvalidTally()
    for i in range(3):
        t.add("bad_json", f"s3://b/f.jsonl line {i + 2}")
    t.add("unknown_label", "s3://b/f.jsonl line 9")
    t.check(records=100, max_fraction=0.04)  # exactly at the threshold passes
    with pytest.raises(DataError) as e:
        t.check(records=100, max_fraction=0.03)
    msg = str(e.value)
    assert msg.startswith("4 of 100 records (4.0%) are invalid")
    assert "bad_json: 3 (the line is not valid JSON; first at s3://b/f.jsonl line 2)" in msg
    assert "unknown_label: 1" in msg and "check spec.dataset.labels" in msg


# ------------------------------------------------------------------------------------------- masking


CHATS = [
    [("user", "say hello"), ("assistant", "hello"), ("user", "again"), ("assistant", "hello")],
    [("system", "Be brief."), ("user", "q1"), ("assistant", "a1")],
    [("user", "q"), ("assistant", ""), ("user", "q2"), ("assistant", "a2")],
    [("assistant", "I speak first."), ("user", "ok")],
    [("user", "only a question"), ("assistant", "answer"), ("user", "trailing question")],
]


@pytest.mark.parametrize("turns", CHATS)
def test_single_render_spans_match_prefix_renders(tokenizer, turns):
    enc = Encoder(tokenizer, "chat", 512)
    assert enc._turn_markers == ("<|im_start|>assistant\n", "<|im_end|>\n")
    full, fast = enc.render_with_spans(turns)
    assert fast == enc._spans_by_prefixes(full, turns)
    answers = [c for r, c in turns if r == "assistant" and c]
    assert [full[s:e] for s, e in fast] == [f"{a}<|im_end|>\n" for a in answers]


def _rendered(render, turns, generation_prompt):
    """The text, or the kind of error (a template may refuse a chat, e.g. one that opens with the assistant)."""
    try:
        return render([{"role": r, "content": c} for r, c in turns], generation_prompt)
    except Exception as e:  # noqa: BLE001
        return type(e).__name__


@pytest.mark.parametrize("name", ["own"] + sorted(chat_templates.NAMED))
def test_direct_render_is_apply_chat_template(tokenizer, name):
    """The compiled template rendered directly (encode._direct_renderer) gives apply_chat_template's text, byte
    for byte, for the model's own template and every named one: same prepared data, same fingerprint."""
    t = tokenizer
    if name != "own":
        t = copy.copy(tokenizer)
        t.chat_template = chat_templates.resolve(name)
    enc = Encoder(t, "chat", 512)
    assert enc._direct is not None, "the direct render is not in use"
    odd = [
        ("system", "  tabs\tand {{ braces }} {% raw %}"),
        ("user", "\u00e9\u4e2d\U0001f600 <b>"),
        ("assistant", "x\n\n"),
    ]
    for turns in CHATS + [odd]:
        for g in (False, True):
            assert _rendered(enc._direct, turns, g) == _rendered(enc._apply_template, turns, g), (name, turns, g)


def test_direct_render_that_disagrees_is_not_used(tokenizer, monkeypatch):
    import kubetune_trainer.data.encode as encode_module

    real = encode_module._direct_renderer

    def off_by_one(tok):
        direct = real(tok)
        return lambda messages, g: direct(messages, g) + " "

    monkeypatch.setattr(encode_module, "_direct_renderer", off_by_one)
    enc = Encoder(tokenizer, "chat", 512)
    assert enc._direct is None
    ex = Example([("user", "What is two plus two?"), ("assistant", "Four.")], None, None, "", 0)
    (out,) = enc.encode([ex])
    assert not tokenizer.decode([int(t) for t in out.input_ids]).endswith(" ")


def test_masks_for_chat_and_a_base_without_template(tokenizer):
    ex = Example([("user", "What is two plus two?"), ("assistant", "Four.")], None, None, "", 0)
    (out,) = Encoder(tokenizer, "chat", 512).encode([ex])
    targets = tokenizer.decode([int(t) for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE])
    assert targets == "Four.<|im_end|>\n"

    # A base model's tokenizer (no chat template) is refused for conversations, naming the field to set ...
    plain = copy.copy(tokenizer)
    plain.chat_template = None
    with pytest.raises(DataError, match="no chat template; set spec.dataset.chatTemplate"):
        Encoder(plain, "instruction", 512)
    Encoder(plain, "completion", 512)  # plain text needs no template

    # ... and with a named one (zephyr: turns end with the tokenizer's own EOS) it is masked the same way.
    plain.chat_template = chat_templates.resolve("zephyr")
    (out,) = Encoder(plain, "instruction", 512).encode([ex])
    text = tokenizer.decode([int(t) for t in out.input_ids])
    assert text == "<|user|>\nWhat is two plus two?<|im_end|>\n<|assistant|>\nFour.<|im_end|>\n"
    targets = tokenizer.decode([int(t) for t, lab in zip(out.input_ids, out.labels) if lab != IGNORE])
    assert targets == "Four.<|im_end|>\n"


@pytest.mark.parametrize("name", sorted(chat_templates.NAMED))
def test_named_templates_render_and_mask(tokenizer, name):
    """Every named template renders prefix-stably, so each assistant turn is found and masked."""
    t = copy.copy(tokenizer)
    t.chat_template = chat_templates.resolve(name)
    ex = Example(
        [
            ("system", "Be brief."),
            ("user", "Hi?"),
            ("assistant", "Hello."),
            ("user", "Bye?"),
            ("assistant", "Goodbye."),
        ],
        None,
        None,
        "",
        0,
    )
    enc = Encoder(t, "chat", 512)
    assert enc._turn_markers is not None
    (out,) = enc.encode([ex])
    targets = tokenizer.decode([int(x) for x, lab in zip(out.input_ids, out.labels) if lab != IGNORE])
    assert "Hello." in targets and "Goodbye." in targets and "Hi?" not in targets and "Be brief" not in targets


def test_chat_template_field_is_validated():
    from pydantic import ValidationError

    ok = {"train": "s3://bucket/x.jsonl", "format": "chat"}
    assert DatasetSpec.model_validate({**ok, "chatTemplate": "llama3"}).chat_template == "llama3"
    inline = "{% for m in messages %}{{ m['content'] }}{% endfor %}"
    assert DatasetSpec.model_validate({**ok, "chatTemplate": inline}).chat_template == inline
    with pytest.raises(ValidationError, match="(?s)chatTemplate.*'llama2' is neither a named template"):
        DatasetSpec.model_validate({**ok, "chatTemplate": "llama2"})


def test_prompt_longer_than_limit_leaves_nothing_to_learn(tokenizer):
    ex = Example([("user", "word " * 100), ("assistant", "answer")], None, None, "", 0)
    assert Encoder(tokenizer, "chat", 32).encode([ex]) == [None]


def test_control_tokens_detected(tokenizer):
    enc = Encoder(tokenizer, "chat", 64)
    assert enc.has_control_token(Example([("user", "hi <|im_start|>")], None, None, "", 0))
    assert not enc.has_control_token(Example([("user", "hi <|im_start")], None, None, "", 0))


# ------------------------------------------------------------------------------------------- packing


def _encoded(n: int, first: int) -> Encoded:
    ids = np.arange(first, first + n, dtype=np.int32)
    return Encoded(ids, ids.copy(), None)


def test_packing_whole_examples_with_positions_and_segments(tmp_path):
    spill = RowSpill(str(tmp_path / "s"), spill_columns(False, 8))
    packer = Packer(spill, width=8, pad_id=0, pack=True, classification=False, block_tokens=16)
    for n, first in [(3, 10), (4, 20), (2, 30), (8, 40), (1, 50)]:
        packer.add(_encoded(n, first))
    packer.finish()
    rows = spill.read()
    # Next-fit over whole examples: an example that does not fit closes the row, none is ever split.
    assert rows["input_ids"].tolist() == [
        [10, 11, 12, 20, 21, 22, 23, 0],
        [30, 31, 0, 0, 0, 0, 0, 0],
        [40, 41, 42, 43, 44, 45, 46, 47],
        [50, 0, 0, 0, 0, 0, 0, 0],
    ]
    assert packer.examples == 5 and packer.max_fill == 8
    assert rows["segment_ids"][0].tolist() == [1, 1, 1, 2, 2, 2, 2, 0]
    assert rows["position_ids"][0].tolist() == [0, 1, 2, 0, 1, 2, 3, 0]
    assert rows["attention_mask"][0].tolist() == [1, 1, 1, 1, 1, 1, 1, 0]
    # The first token of every example is never a target (it would be predicted from the previous example).
    assert rows["labels"][0].tolist() == [IGNORE, 11, 12, IGNORE, 21, 22, 23, IGNORE]
    assert rows["labels"][3].tolist() == [IGNORE] * 8


def test_unpacked_and_classification_rows(tmp_path):
    spill = RowSpill(str(tmp_path / "u"), spill_columns(False, 6))
    packer = Packer(spill, width=6, pad_id=9, pack=False, classification=False)
    packer.add(_encoded(2, 1))
    packer.add(_encoded(3, 5))
    packer.finish()
    rows = spill.read()
    assert rows["input_ids"].tolist() == [[1, 2, 9, 9, 9, 9], [5, 6, 7, 9, 9, 9]]
    assert packer.max_fill == 3

    spill = RowSpill(str(tmp_path / "c"), spill_columns(True, 4))
    packer = Packer(spill, width=4, pad_id=0, pack=True, classification=True)  # never packed
    packer.add(Encoded(np.array([5, 6], np.int32), None, 1))
    packer.add(Encoded(np.array([7], np.int32), None, 0))
    packer.finish()
    rows = spill.read()
    assert rows["input_ids"].tolist() == [[5, 6, 0, 0], [7, 0, 0, 0]]
    assert rows["label"].tolist() == [1, 0]


# --------------------------------------------------------------------------------------------- dedup


def test_hash_set_matches_a_python_set():
    rng = random.Random(3)
    values = [rng.getrandbits(64) for _ in range(20000)]
    values += values[:5000]
    rng.shuffle(values)
    hs, ref = HashSet64(), set()
    for i in range(0, len(values), 300):
        batch = values[i : i + 300]
        expected = []
        for v in batch:
            expected.append(v in ref)
            ref.add(v)
        assert hs.check_and_add(np.array(batch, dtype=np.uint64)).tolist() == expected
    assert len(hs) == len(ref) == 20000


def test_near_dedup_keeps_the_first():
    nd = NearDedup(0.7)
    assert not nd.is_duplicate("the cat sat on the mat and looked at the door for a while")
    assert nd.is_duplicate("the cat sat on the mat and looked at the door for a while!")
    assert not nd.is_duplicate("completely unrelated words about distributed training")


# --------------------------------------------------------------------------------------- fingerprint


def _cfg(**dataset):
    spec = parse_spec(
        {
            "model": {"uri": "s3://bucket/m"},
            "output": {"uri": "s3://bucket/o"},
            "dataset": {"train": "s3://bucket/d", "format": "completion", **dataset},
        }
    )
    return resolve_trainer_config("j", "default", None, spec)


def test_fingerprint_covers_what_changes_the_output(tokenizer):
    objs = [{"uri": "s3://bucket/d/a.jsonl", "etag": "e1", "size": 10}]
    tid = tokenizer_identity(tokenizer)
    base = fingerprint(_cfg(), objs, [], tid, 2)
    assert base == fingerprint(_cfg(), objs, [], tid, 2)
    # Where the data is read from is not what it is.
    assert base == fingerprint(_cfg(endpoint="http://other:9000", credentialsSecret="s3-keys"), objs, [], tid, 2)
    assert base != fingerprint(_cfg(preprocessing={"maxSeqLength": 64}), objs, [], tid, 2)
    assert base != fingerprint(_cfg(), [{**objs[0], "etag": "e2"}], [], tid, 2)
    assert base != fingerprint(_cfg(), objs, [], tid, 3)
    assert base != fingerprint(_cfg(), objs, [], "another-tokenizer", 2)
    other = copy.copy(tokenizer)
    other.chat_template = "{{ messages }}"
    assert tokenizer_identity(other) != tid


def test_parse_uri():
    assert parse_uri("s3://bucket/a/b.jsonl") == ("bucket", "a/b.jsonl")
    assert parse_uri("s3://bucket") == ("bucket", "")
    for bad in ("http://bucket/x", "s3:///x", "bucket/x"):
        with pytest.raises(DataError):
            parse_uri(bad)


def test_shard_table_wraps_the_arrays_as_pyarrow_would(tmp_path):
    """shards._table wraps numpy buffers directly (pa.array would import pandas): same Arrow table, also for a
    trimmed (non-contiguous) slice of a memory map and for a 1-D label column."""
    import pyarrow as pa

    from kubetune_trainer.data.shards import _table

    spill = RowSpill(str(tmp_path / "rows"), {"input_ids": (np.dtype(np.int32), 8), "label": (np.dtype(np.int64), 0)})
    spill.append({"input_ids": np.arange(40, dtype=np.int32).reshape(5, 8), "label": np.arange(5, dtype=np.int64)})
    spill.close()
    cols = spill.read()
    block = {"input_ids": cols["input_ids"][[4, 1, 2], :5], "label": cols["label"][[4, 1, 2]]}
    expected = pa.table(
        {
            "input_ids": pa.FixedSizeListArray.from_arrays(pa.array(block["input_ids"].reshape(-1)), 5),
            "label": pa.array(block["label"]),
        }
    )
    got = _table(block)
    assert got.equals(expected) and got.schema == expected.schema
    assert got.column("input_ids").to_pylist()[0] == [32, 33, 34, 35, 36]
    assert _table({k: v[:0] for k, v in block.items()}).schema == expected.schema
