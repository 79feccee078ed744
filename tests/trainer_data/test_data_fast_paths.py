"""The fast paths of the data side give what the plain ones give: orjson's JSONL parsing (the stdlib decides every
line orjson refuses) and the masking that reads token offsets only at span edges."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from kubetune.api import DatasetSpec
from kubetune_trainer.data.encode import IGNORE, Encoder, _in_spans
from kubetune_trainer.data.readers import _jsonl_records
from kubetune_trainer.data.records import Example, RecordRules, parse_record

pytestmark = pytest.mark.unit


def _plain_jsonl(lines: list[bytes]) -> list[tuple[str, object, object]]:
    """The records as the stdlib alone reads them (the reference the fast path must match)."""
    out: list[tuple[str, object, object]] = []
    for lineno, raw in enumerate(lines, start=1):
        where = f"s3://b/f.jsonl line {lineno}"
        try:
            line = raw.decode("utf-8")
        except UnicodeDecodeError:
            out.append((where, None, "bad_encoding"))
            continue
        line = (line.lstrip("\ufeff") if lineno == 1 else line).strip()
        if not line:
            continue
        try:
            value = json.loads(line)
        except ValueError:
            out.append((where, None, "bad_json"))
            continue
        out.append((where, value, None) if isinstance(value, dict) else (where, None, "not_an_object"))
    return out


LINES = [
    b'\xef\xbb\xbf{"a": 1}\n',  # a byte-order mark on the first line: dropped
    b'{"a": NaN, "b": Infinity, "c": -Infinity}\n',  # the stdlib's extensions: accepted
    b'{"label": 100000000000000000000}\n',  # beyond 64 bits: an int, not orjson's float
    b'{"label": 18446744073709551616, "text": "x"}\n',
    b'{"a": 1e400}\n',  # inf by the stdlib
    b'{"a": "\\ud800 lone surrogate"}\n',  # the stdlib keeps it; orjson refuses
    b'{"a": "\\ud83d\\ude00 a pair"}\n',
    b'{"a": 1, "a": 2}\n',  # the last duplicate wins
    b'\xef\xbb\xbf{"a": 1}\n',  # a byte-order mark after the first line: bad JSON
    b'{"a": 1}\x1c\n',  # a separator the stdlib's strip() drops
    b'{"a": 1}\r\n',
    b"   \n",
    b"\n",
    b'{"a": "\xff"}\n',  # not UTF-8
    b'{"a": "\xed\xa0\x80"}\n',  # an encoded surrogate: not UTF-8 either
    b'{"a": 1,}\n',
    b"{'a': 1}\n",
    b'{"a": 01}\n',
    b'{"a": "tab\there"}\n',
    b'{"a": 1} {"b": 2}\n',
    b"[1, 2]\n",
    b"18446744073709551616\n",
    b'"a string"\n',
    b"null\n",
    b'{"messages": [{"role": "user", "content": "q"}], "score": 0.5}\n',
    b'{"a": 1}',  # the last line without its newline
]


def _same(a: object, b: object) -> bool:
    """Equal, with NaN equal to itself and ints told from floats."""
    if isinstance(a, float) and isinstance(b, float):
        return (math.isnan(a) and math.isnan(b)) or a == b
    if isinstance(a, dict) and isinstance(b, dict):
        return list(a) == list(b) and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return type(a) is type(b) and a == b


def test_jsonl_lines_read_as_the_stdlib_reads_them():
    got = list(_jsonl_records(LINES, "s3://b/f.jsonl", strip_bom=True))
    want = _plain_jsonl(LINES)
    assert [(w, r) for w, _, r in got] == [(w, r) for w, _, r in want]
    for (_, v, _), (_, ref, _) in zip(got, want):
        assert _same(v, ref), (v, ref)
    # A nested integer beyond 64 bits stays orjson's float: no record format reads a nested number (readers.py).
    ((_, nested, _),) = _jsonl_records([b'{"nested": {"n": -9223372036854775809}}\n'], "s3://b/f.jsonl", True)
    assert nested == {"nested": {"n": -9.223372036854776e18}}
    reasons = [r for _, _, r in got]
    assert reasons.count("bad_encoding") == 2 and reasons.count("bad_json") == 6
    assert reasons.count("not_an_object") == 4


def test_a_label_beyond_64_bits_is_still_an_unknown_label():
    # orjson would make it a float (wrong_type); the stdlib keeps the int, a class id out of range.
    ds = DatasetSpec.model_validate({"train": "s3://bucket/x.jsonl", "format": "classification", "labels": ["a", "b"]})
    rules = RecordRules.from_spec(ds, None)
    lines = [b'{"text": "x", "label": 18446744073709551616}\n', b'{"text": "x", "label": 1}\n']
    values = [v for _, v, _ in _jsonl_records(lines, "s3://b/f.jsonl", strip_bom=True)]
    assert [parse_record(v, rules) for v in values][0] == "unknown_label"  # type: ignore[arg-type]
    second = parse_record(values[1], rules)  # type: ignore[arg-type]
    assert isinstance(second, Example) and second.label == 1


# ------------------------------------------------------------------------------------------- masking

PIECES = list("ab cd\n\t  é中😀👍🏽x\u0301.,") + ["<|im_end|>", "<|im_start|>", "   ", "\n\n", "Hello", " world"]


def _random_batch(rng: random.Random) -> list[tuple[str, list[tuple[int, int]]]]:
    """Texts with 0-3 ordered, disjoint spans anywhere: inside a multi-byte character's tokens, inside a run of
    spaces, at the very end."""
    out = []
    for _ in range(48):
        text = "".join(rng.choice(PIECES) for _ in range(rng.randint(0, 50)))
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, 2 * rng.randint(0, 3))))
        out.append((text, [(cuts[k], cuts[k + 1]) for k in range(0, len(cuts) - 1, 2)]))
    return out


@pytest.mark.parametrize("max_len", [6, 17, 512])
def test_span_edges_mask_as_every_offset_does(tokenizer, max_len):
    """Targets found at span edges are those of every token's offsets, truncated at maxSeqLength or not."""
    enc = Encoder(tokenizer, "chat", max_len)
    assert enc._starts_in_order
    assert enc._fast is not None
    rng = random.Random(max_len)
    for _ in range(20):
        rendered = _random_batch(rng)
        encs = enc._fast.encode_batch([t for t, _ in rendered], add_special_tokens=False)
        _, ends = enc._flat_ids(encs)
        target = enc._targets(encs, rendered, ends)
        want = [_in_spans(e.offsets[:max_len], spans) for e, (_, spans) in zip(encs, rendered)]
        assert np.array_equal(target, np.concatenate(want) if want else np.zeros(0, dtype=bool))


def test_truncated_chat_masks_as_every_offset_does(tokenizer):
    """A long prompt cut at maxSeqLength inside the answer, multi-turn chats: same labels either way."""
    examples = [
        Example([("user", "word " * n), ("assistant", "an answer é中 " * 3)], None, None, "", 0)
        for n in range(0, 60, 7)
    ] + [
        Example(
            [("system", "terse"), ("user", "q1"), ("assistant", "a1"), ("user", "q2"), ("assistant", "a2 😀")],
            None,
            None,
            "",
            0,
        )
    ]
    fast = Encoder(tokenizer, "chat", 40)
    plain = Encoder(tokenizer, "chat", 40)
    plain._starts_in_order = False  # every record reads every offset
    got, want = fast.encode(examples), plain.encode(examples)
    assert [g is None for g in got] == [w is None for w in want]
    assert any(g is None for g in got) and any(g is not None and (g.labels == IGNORE).any() for g in got)
    for g, w in zip(got, want):
        if g is not None and w is not None:
            assert np.array_equal(g.input_ids, w.input_ids) and np.array_equal(g.labels, w.labels)


def test_a_reordering_normalizer_reads_every_offset(tokenizer):
    import copy

    from tokenizers import normalizers

    t = copy.deepcopy(tokenizer)
    t.backend_tokenizer.normalizer = normalizers.Sequence([normalizers.NFC()])
    assert not Encoder(t, "chat", 64)._starts_in_order
