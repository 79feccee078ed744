"""Bundled sample datasets, built from text that ships with Debian and Python (nothing invented, nothing
downloaded), for the quickstart and the tests.

- fortunes-instruction: Debian's `fortunes` collection (apt package `fortunes`, /usr/share/games/fortunes).
  A fortune attributed to a person ("-- Mark Twain") becomes "Give me a quote by Mark Twain." -> the quote;
  any other becomes 'Tell me a fortune from the "<collection>" collection.' -> the fortune as printed (with
  its attribution line, if any). A small model visibly picks up the style of each collection and the
  quote/answer layout; held-out loss drops within tens of steps.
- pydoc-chat: Python's own reference topics (`pydoc_data.topics`, the text behind `help("for")`): for every
  topic and section, "What does the Python reference say about <title>?" -> its first prose paragraph, as a
  chat with a fixed system prompt. The records come from the running interpreter's standard library, so they
  are deterministic per Python version.
- fortunes-classification: which collection a fortune comes from, over a few collections with distinct
  vocabulary (computers, food, law, love, science, sports), balanced by taking the first N of each.

Everything is deterministic: files are read in sorted order, entries in file order, and the train/validation
split is by a hash of each record.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

FORTUNES_DIR = "/usr/share/games/fortunes"
# Drawings need their exact whitespace (which preprocessing normalises away); translate-me is not English.
EXCLUDED_COLLECTIONS = ("ascii-art", "translate-me")
CLASSIFICATION_COLLECTIONS = ("computers", "food", "law", "love", "science", "sports")
PYDOC_SYSTEM_PROMPT = "You answer questions about the Python language reference."


@dataclass(frozen=True)
class Fortune:
    collection: str
    text: str
    author: str | None  # the attribution line without "-- ", None when there is none


def _strip_overstrike(s: str) -> str:
    # Old fortunes underline words with "____^H^H^H^Hword" (terminal overstriking): drop each character that a
    # backspace erases, repeatedly, leaving the word.
    while "\b" in s:
        s2 = re.sub(r"[^\x08]\x08", "", s)  # \x08, not \b: outside a class \b is a word boundary
        if s2 == s:
            return s.replace("\b", "")
        s = s2
    return s


_ATTRIBUTION = re.compile(r"^\s+--\s*(.+)$")


def parse_fortune_file(raw: str, collection: str) -> list[Fortune]:
    """The entries of one %-separated fortune file."""
    out = []
    for entry in re.split(r"^%\s*$", raw.replace("\r\n", "\n"), flags=re.MULTILINE):
        lines = _strip_overstrike(entry).strip("\n").split("\n")
        if not any(line.strip() for line in lines):
            continue
        author = None
        # The attribution is the last line that starts with indentation and "--"; it may wrap onto more lines.
        for i in range(len(lines) - 1, 0, -1):
            m = _ATTRIBUTION.match(lines[i])
            if m:
                author = " ".join([m.group(1).strip()] + [line.strip() for line in lines[i + 1 :]])
                lines = lines[:i]
                break
        text = "\n".join(lines).strip()
        if text:
            out.append(Fortune(collection, text, author))
    return out


def read_fortunes(directory: str = FORTUNES_DIR) -> dict[str, list[Fortune]]:
    """Every collection of the fortunes package: name -> entries in file order."""
    if not os.path.isdir(directory):
        raise FileNotFoundError(f"{directory} not found: install Debian's fortunes (apt-get install fortunes)")
    out: dict[str, list[Fortune]] = {}
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        # Each collection is a text file plus its strfile index (.dat) and a .u8 link to itself.
        if "." in name or name in EXCLUDED_COLLECTIONS or not os.path.isfile(path) or os.path.islink(path):
            continue
        data = Path(path).read_bytes()
        try:
            raw = data.decode("utf-8")
        except UnicodeDecodeError:
            raw = data.decode("latin-1")
        out[name] = parse_fortune_file(raw, name)
    return out


# A person's name: capitalised words, initials and particles ("Oscar Wilde", "R. A. Heinlein", "Lao Tsu").
_PERSON = re.compile(r"^[A-Z][\w'.-]*(?: (?:[A-Z][\w'.-]*|de|van|von|da|du|la|le)){0,4}$")


def person(author: str) -> str | None:
    """The person an attribution names, or None when it names a book, a show or a situation.

    'Mark Twain, "Pudd'nhead Wilson's Calendar"' -> 'Mark Twain'; 'Steve Jobs (1955-2011)' -> 'Steve Jobs';
    'a contestant on "Hollywood Squares"' -> None.
    """
    name = re.sub(r"\s*\(.*?\)", "", author.split(",")[0]).strip().rstrip(".")
    return name if _PERSON.match(name) and len(name) <= 40 else None


def fortune_instructions(directory: str = FORTUNES_DIR, max_chars: int = 500) -> list[dict[str, str]]:
    """The fortunes-instruction sample: {"prompt", "response"} records."""
    records = []
    for collection, fortunes in read_fortunes(directory).items():
        for f in fortunes:
            if len(f.text) > max_chars:
                continue  # long stories are beyond what a small model can visibly learn in a quickstart
            who = person(f.author) if f.author else None
            if who:
                records.append({"prompt": f"Give me a quote by {who}.", "response": f.text})
            else:
                printed = f.text + (f"\n\t\t-- {f.author}" if f.author else "")
                records.append(
                    {"prompt": f'Tell me a fortune from the "{collection}" collection.', "response": printed}
                )
    return records


def fortune_classification(
    directory: str = FORTUNES_DIR,
    collections: tuple[str, ...] = CLASSIFICATION_COLLECTIONS,
    per_class: int = 120,
    max_chars: int = 500,
) -> tuple[list[dict[str, Any]], list[str]]:
    """The fortunes-classification sample: ({"text", "label"} records with label names, the label names)."""
    all_fortunes = read_fortunes(directory)
    records: list[dict[str, Any]] = []
    for name in collections:
        kept = [f for f in all_fortunes.get(name, []) if len(f.text) <= max_chars][:per_class]
        records.extend({"text": f.text, "label": name} for f in kept)
    return records, list(collections)


def fortune_preferences(directory: str = FORTUNES_DIR, max_words: int = 40) -> list[dict[str, str]]:
    """The fortunes-preference sample for DPO: {"prompt", "chosen", "rejected"} records where chosen is a whole
    fortune and rejected the same fortune cut off mid-sentence (after 40-80% of its words, rounded down; never after a word
    that ends a sentence; the cut is seeded by the text, so the sample is stable). Complete answers over cut-off
    ones: a preference SmolLM2-135M-Instruct does not have (the summed log-probability favours the shorter text,
    so the base ranks ~20% of pairs right; word-shuffled rejections it already ranks 100% right) and that DPO
    learns in a few steps."""
    records = []
    for collection, fortunes in read_fortunes(directory).items():
        for f in fortunes:
            words = f.text.split()
            if not 4 <= len(words) <= max_words:
                continue
            cut = _mid_sentence_cut(words, f.text)
            if cut is None:
                continue
            records.append(
                {
                    "prompt": f'Tell me a fortune from the "{collection}" collection.',
                    "chosen": " ".join(words),
                    "rejected": " ".join(words[:cut]),
                }
            )
    return records


def _mid_sentence_cut(words: list[str], text: str) -> int | None:
    """A number of leading words (40-80% of them) that does not end a sentence, or None when there is none."""
    cuts = [
        i
        for i in range(max(2, len(words) * 2 // 5), len(words) * 4 // 5 + 1)
        if not words[i - 1].rstrip("\"')").endswith((".", "!", "?", ":", ";"))
    ]
    if not cuts:
        return None
    return random.Random(hashlib.blake2b(text.encode(), digest_size=8).digest()).choice(cuts)


_UNDERLINE = re.compile(r"^([*=\-])\1{2,}$")


def _sections(text: str) -> list[tuple[int, str, list[str]]]:
    """(level, title, paragraphs) for each underlined heading of a pydoc topic (* top, = section, - sub)."""
    lines = text.split("\n")
    heads = [
        i
        for i in range(1, len(lines))
        if _UNDERLINE.match(lines[i].strip())
        and lines[i - 1].strip()
        and len(lines[i].strip()) >= len(lines[i - 1].strip()) - 1
    ]
    out = []
    for n, i in enumerate(heads):
        end = heads[n + 1] - 1 if n + 1 < len(heads) else len(lines)
        body = "\n".join(lines[i + 1 : end])
        paragraphs = [p for p in re.split(r"\n\s*\n", body) if p.strip()]
        level = "*=-".index(lines[i].strip()[0])
        out.append((level, lines[i - 1].strip(), paragraphs))
    return out


def _first_prose(paragraphs: list[str]) -> str | None:
    """The first prose paragraph, reflowed; when it introduces a grammar rule or example (ends with ":"), the
    indented block and the next prose paragraph come with it, so the answer never stops at a colon."""
    out: list[str] = []
    for p in paragraphs:
        if p.startswith((" ", "\t")):
            if out:
                out.append(p.rstrip())  # grammar/code, indentation kept
            continue
        out.append(" ".join(line.strip() for line in p.strip().split("\n")))
        if not out[-1].endswith(":") or len(out) >= 5:
            break
    if out and out[-1].endswith(":") and len(out) == 1:
        return None
    return "\n\n".join(out) or None


def _about(title: str) -> str:
    # 'The "for" statement' -> 'the "for" statement'; titles that are names ("Emulating ...") keep their case.
    return title[0].lower() + title[1:] if title.startswith(("The ", "A ", "An ")) else title


def pydoc_chats(min_chars: int = 40) -> list[dict[str, Any]]:
    """The pydoc-chat sample: {"messages": [system, user, assistant]} records."""
    from pydoc_data.topics import topics

    records = []
    for key in sorted(topics):
        top = None
        for level, title, paragraphs in _sections(topics[key]):
            if level == 0:
                top = title
            answer = _first_prose(paragraphs)
            if not answer or len(answer) < min_chars:
                continue
            subject = _about(title) if level == 0 or top is None else f"{_about(title)} ({_about(top)})"
            records.append(
                {
                    "messages": [
                        {"role": "system", "content": PYDOC_SYSTEM_PROMPT},
                        {"role": "user", "content": f"What does the Python reference say about {subject}?"},
                        {"role": "assistant", "content": answer},
                    ]
                }
            )
    # The same section can appear under two topic keys; keep the first.
    seen: set[str] = set()
    unique = []
    for r in records:
        k = json.dumps(r, sort_keys=True)
        if k not in seen:
            seen.add(k)
            unique.append(r)
    return unique


def split_records(
    records: list[dict[str, Any]], validation_fraction: float, seed: int = 0
) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(train, validation) by a hash of each record and the seed: stable under reordering and additions."""
    train: list[dict[str, Any]] = []
    validation: list[dict[str, Any]] = []
    for r in records:
        d = hashlib.blake2b(f"{seed}:{json.dumps(r, sort_keys=True)}".encode(), digest_size=8).digest()
        (validation if int.from_bytes(d, "little") / 2.0**64 < validation_fraction else train).append(r)
    return train, validation


def write_jsonl(records: list[dict[str, Any]], path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with path.open("w", encoding="utf-8") as f:
        for r in records:
            f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return path


# name -> (format, builder returning records); the FineTuneJob dataset.format each sample is meant for.
SAMPLES: dict[str, tuple[str, Callable[[], list[dict[str, Any]]]]] = {
    "fortunes-instruction": ("instruction", fortune_instructions),
    "pydoc-chat": ("chat", pydoc_chats),
    "fortunes-classification": ("classification", lambda: fortune_classification()[0]),
    "fortunes-preference": ("preference", fortune_preferences),
}

# name -> the version of its builder's output, bumped when a sample's records change, so that an embedded S3 store
# seeded earlier is seeded again (builtin.is_present). Absent: 1. fortunes-preference 2: rejected is the fortune
# cut off mid-sentence (was: its words shuffled, which the base model already ranked right).
VERSIONS: dict[str, int] = {"fortunes-preference": 2}


def write_sample(name: str, out_dir: str | Path, validation_fraction: float = 0.1, seed: int = 0) -> tuple[Path, Path]:
    """Write <out_dir>/<name>/train.jsonl and validation.jsonl; returns their paths."""
    if name not in SAMPLES:
        raise KeyError(f"unknown sample {name!r}; known: {', '.join(SAMPLES)}")
    train, validation = split_records(SAMPLES[name][1](), validation_fraction, seed)
    base = Path(out_dir) / name
    return write_jsonl(train, base / "train.jsonl"), write_jsonl(validation, base / "validation.jsonl")
