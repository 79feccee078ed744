"""The bundled sample datasets: parsed from Debian's fortunes and Python's pydoc topics, deterministic."""

from __future__ import annotations

import json
import os
from collections import Counter

import pytest

from kubetune_cli.localenv import samples

pytestmark = pytest.mark.unit

needs_fortunes = pytest.mark.skipif(
    not os.path.isdir(samples.FORTUNES_DIR), reason="Debian package fortunes not installed (apt-get install fortunes)"
)


def test_parse_fortune_file_attribution_and_overstrike():
    raw = (
        'First fortune,\n\ton two lines.\n\t\t-- Mark Twain, "Pudd\'nhead Wilson"\n%\n'
        "No attribution -- just a dash inside.\n%\n"
        "Nobody ____\b\b\b\bdoes anything.\n%\n"
        'Long attribution.\n\t\t-- A. A. Milne, "Winnie the Pooh,"\n\t\tChapter VI\n%\n'
    )
    got = samples.parse_fortune_file(raw, "test")
    assert [(f.text, f.author) for f in got] == [
        ("First fortune,\n\ton two lines.", 'Mark Twain, "Pudd\'nhead Wilson"'),
        ("No attribution -- just a dash inside.", None),
        ("Nobody does anything.", None),
        ("Long attribution.", 'A. A. Milne, "Winnie the Pooh," Chapter VI'),
    ]
    assert samples.person('Mark Twain, "Pudd\'nhead Wilson"') == "Mark Twain"
    assert samples.person("Steve Jobs (1955-2011)") == "Steve Jobs"
    assert samples.person("R. A. Heinlein") == "R. A. Heinlein"
    assert samples.person('a contestant on "Hollywood Squares"') is None


@needs_fortunes
def test_fortune_samples_are_real_and_deterministic():
    fortunes = samples.read_fortunes()
    assert "wisdom" in fortunes and "ascii-art" not in fortunes
    originals = {f.text for fs in fortunes.values() for f in fs}

    records = samples.fortune_instructions()
    assert len(records) > 5000 and records == samples.fortune_instructions()
    quotes = [r for r in records if r["prompt"].startswith("Give me a quote by ")]
    assert len(quotes) > 1000
    assert all(r["response"] in originals for r in quotes)  # nothing invented: every answer is a fortune
    assert {"Give me a quote by Mark Twain.", 'Tell me a fortune from the "computers" collection.'} <= {
        r["prompt"] for r in records
    }

    cls, labels = samples.fortune_classification()
    assert labels == list(samples.CLASSIFICATION_COLLECTIONS)
    assert Counter(r["label"] for r in cls) == {name: 120 for name in labels}
    assert all(r["text"] in originals for r in cls)


@needs_fortunes
def test_fortune_preference_sample_prefers_the_whole_fortune_over_a_cut_off_one():
    records = samples.fortune_preferences()
    assert len(records) > 10000 and records == samples.fortune_preferences()
    for r in records:
        chosen, rejected = r["chosen"].split(), r["rejected"].split()
        # rejected is the chosen fortune's first 40-80% of words (rounded down), cut where no sentence ends
        assert chosen[: len(rejected)] == rejected and len(chosen) * 2 // 5 <= len(rejected) <= len(chosen) * 4 // 5
        assert not rejected[-1].rstrip("\"')").endswith((".", "!", "?", ":", ";"))
        assert r["prompt"].startswith("Tell me a fortune from the ")


def test_pydoc_chat_sample():
    records = samples.pydoc_chats()
    assert len(records) > 100 and records == samples.pydoc_chats()
    by_question = {r["messages"][1]["content"]: r["messages"][2]["content"] for r in records}
    answer = by_question['What does the Python reference say about the "assert" statement?']
    assert answer.startswith("Assert statements are a convenient way to insert debugging assertions")
    from pydoc_data.topics import topics

    assert "Assert statements are a convenient way" in topics["assert"]
    assert all(r["messages"][0] == {"role": "system", "content": samples.PYDOC_SYSTEM_PROMPT} for r in records)


@needs_fortunes
def test_write_sample_split(tmp_path):
    train, validation = samples.write_sample("fortunes-classification", tmp_path, validation_fraction=0.2)
    t = [json.loads(line) for line in train.read_text().splitlines()]
    v = [json.loads(line) for line in validation.read_text().splitlines()]
    assert len(t) + len(v) == 720 and 100 < len(v) < 190
    again = samples.write_sample("fortunes-classification", tmp_path / "again", validation_fraction=0.2)
    assert again[1].read_text() == validation.read_text()
    with pytest.raises(KeyError, match="unknown sample"):
        samples.write_sample("nope", tmp_path)
