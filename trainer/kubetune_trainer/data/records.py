"""Turning one raw record into a clean example of its format, or the reason it cannot be used.

Formats: chat (a list of {role, content}), instruction (prompt/response, optional system and input), completion
(text), classification (text + label id or name). Instruction records become a three-turn chat so one code path
renders and masks both (see encode.py). Every text is normalised here, before dedup and length filters.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, cast

from kubetune.api import DatasetSpec, DataSource
from kubetune_trainer.data.normalize import normalize_text

ROLES = ("system", "user", "assistant")


@dataclass(slots=True)
class Example:
    """A valid, normalised record."""

    messages: list[tuple[str, str]] | None  # chat and instruction: (role, content) turns
    text: str | None  # completion and classification
    label: int | None  # classification class id
    content: str  # every text of the record joined (with role tags for chat): what dedup hashes; not pickled
    chars: int  # characters of text, summed over the record's text fields: what the length filters measure
    # preference: messages is the prompt; chosen and rejected are the two continuations (assistant turns)
    chosen: list[tuple[str, str]] | None = None
    rejected: list[tuple[str, str]] | None = None

    def __reduce__(self) -> tuple[type[Example], tuple[Any, ...]]:
        # Examples travel (Ray's object store, local disk) only from the parse step, which has hashed and signed
        # `content` already, to the encode step, which renders the fields: content, a second copy of every text,
        # stays behind, halving what travels (and the pickling: 138 -> 84 ms for 20,000 chats). Rebuilding an
        # example from its fields is also about twice as fast as the slots dataclass's default __setstate__.
        return (Example, (self.messages, self.text, self.label, "", self.chars, self.chosen, self.rejected))


@dataclass(frozen=True)
class RecordRules:
    """What parse_record needs from the spec, resolved once."""

    format: str
    messages: str
    prompt: str
    response: str
    system: str
    text: str
    label: str
    label_names: tuple[str, ...] | None
    num_labels: int | None
    unicode_form: str
    whitespace: bool
    input: str | None = None
    chosen: str = "chosen"
    rejected: str = "rejected"

    @classmethod
    def from_spec(cls, ds: DatasetSpec, num_labels: int | None, source: DataSource | None = None) -> RecordRules:
        """The rules of the dataset's own format and fields, or of one (defaults-filled) training source."""
        f, p = (source.fields if source and source.fields else ds.fields), ds.preprocessing
        return cls(
            format=(source.format if source and source.format else ds.format),
            messages=f.messages,
            prompt=f.prompt,
            response=f.response,
            system=f.system,
            text=f.text,
            label=f.label,
            label_names=tuple(ds.labels) if ds.labels else None,
            num_labels=num_labels if num_labels is not None else (len(ds.labels) if ds.labels else None),
            unicode_form=p.unicode_normalization,
            whitespace=p.normalize_whitespace,
            input=f.input,
            chosen=f.chosen or "chosen",
            rejected=f.rejected or "rejected",
        )

    def columns(self) -> list[str]:
        """The record keys this format reads (Parquet reads only these columns)."""
        return {
            "chat": [self.messages],
            "instruction": [self.system, self.prompt, self.response] + ([self.input] if self.input else []),
            "completion": [self.text],
            "classification": [self.text, self.label],
            "preference": [self.prompt, self.chosen, self.rejected],
        }[self.format]


# Separates fields in Example.content; a control character no normalised text contains.
_SEP = "\x1f"


def parse_record(value: dict[str, Any], rules: RecordRules) -> Example | str:
    """An Example, or the invalid reason (see invalid.REASONS).

    Presence and type of every field are checked before emptiness, and emptiness before label membership, so
    a record's reason does not depend on the order of its fields.
    """
    if rules.format == "chat":
        return _chat(value, rules)
    if rules.format == "instruction":
        return _instruction(value, rules)
    if rules.format == "completion":
        text, reason = _text(value, rules.text, rules)
        return reason or Example(None, text, None, text, len(text))
    if rules.format == "preference":
        return _preference(value, rules)
    return _classification(value, rules)


def _text(value: dict[str, Any], key: str, rules: RecordRules, required: bool = True) -> tuple[str, str | None]:
    """(normalised text, None) or ("", reason)."""
    v = value.get(key)
    if v is None:
        return "", ("missing_field" if required else None)
    if not isinstance(v, str):
        return "", "wrong_type"
    v = normalize_text(v, rules.unicode_form, rules.whitespace)
    if not v and required:
        return "", "empty_text"
    return v, None


def _first_reason(*reasons: str | None) -> str | None:
    for r in ("missing_field", "wrong_type", "empty_text"):
        if r in reasons:
            return r
    return None


def _turns(msgs: Any, rules: RecordRules) -> list[tuple[str, str]] | str:
    """A list of {role, content} messages as normalised (role, content) turns, or the invalid reason."""
    if msgs is None:
        return "missing_field"
    if not isinstance(msgs, list):
        return "wrong_type"
    turns: list[tuple[str, str]] = []
    for m in msgs:
        if not isinstance(m, dict):
            return "wrong_type"
        role, content = m.get("role"), m.get("content")
        if role is None or content is None:
            return "missing_field"
        if not isinstance(role, str) or not isinstance(content, str):
            return "wrong_type"
        if role not in ROLES:
            return "unknown_role"
        turns.append((role, normalize_text(content, rules.unicode_form, rules.whitespace)))
    return turns


def _chat(value: dict[str, Any], rules: RecordRules) -> Example | str:
    turns = _turns(value.get(rules.messages), rules)
    if isinstance(turns, str):
        return turns
    if not any(c for _, c in turns):
        return "empty_text"
    if not any(r == "assistant" and c for r, c in turns):
        return "no_assistant_turn"
    return Example(turns, None, None, _SEP.join(f"{r}:{c}" for r, c in turns), sum(len(c) for _, c in turns))


def _instruction(value: dict[str, Any], rules: RecordRules) -> Example | str:
    system, r1 = _text(value, rules.system, rules, required=False)
    prompt, r2 = _text(value, rules.prompt, rules)
    response, r3 = _text(value, rules.response, rules)
    extra, r4 = _text(value, rules.input, rules, required=False) if rules.input else ("", None)
    reason = _first_reason(r1, r2, r3, r4)
    if reason:
        return reason
    if extra:
        prompt = f"{prompt}\n\n{extra}"  # Alpaca's layout of instruction + input
    turns = ([("system", system)] if system else []) + [("user", prompt), ("assistant", response)]
    return Example(turns, None, None, _SEP.join((system, prompt, response)), len(system) + len(prompt) + len(response))


def _preference(value: dict[str, Any], rules: RecordRules) -> Example | str:
    """prompt (text, or chat messages) + chosen and rejected (text, or assistant messages)."""
    parts: list[list[tuple[str, str]]] = []
    for key, role in ((rules.prompt, "user"), (rules.chosen, "assistant"), (rules.rejected, "assistant")):
        v = value.get(key)
        if isinstance(v, str):
            turns: list[tuple[str, str]] | str = [(role, normalize_text(v, rules.unicode_form, rules.whitespace))]
        else:
            turns = _turns(v, rules)
        if isinstance(turns, str):
            return turns
        parts.append(turns)
    prompt, chosen, rejected = parts
    for answer in (chosen, rejected):
        if not answer or not any(c for _, c in answer):
            return "empty_text"
        if any(r != "assistant" for r, _ in answer):
            return "unknown_role"  # a continuation is the model's own turn(s)
    if not any(c for _, c in prompt):
        return "empty_text"
    if chosen == rejected:
        return "same_responses"
    content = _SEP.join(f"{r}:{c}" for r, c in prompt + [("chosen", "")] + chosen + [("rejected", "")] + rejected)
    chars = sum(len(c) for _, c in prompt + chosen + rejected)
    return Example(prompt, None, None, content, chars, chosen, rejected)


def _classification(value: dict[str, Any], rules: RecordRules) -> Example | str:
    text, r1 = _text(value, rules.text, rules)
    raw = value.get(rules.label)
    r2 = None
    if raw is None:
        r2 = "missing_field"
    elif isinstance(raw, bool) or not isinstance(raw, (int, str)):
        # bool is an int subclass in Python; True as a class id is almost surely a mistake in the data.
        r2 = "wrong_type"
    reason = _first_reason(r1, r2)
    if reason:
        return reason
    if isinstance(raw, str):
        name = raw.strip()
        if rules.label_names is None or name not in rules.label_names:
            return "unknown_label"
        label = rules.label_names.index(name)
    else:
        label = cast(int, raw)  # an int: None, bool and other types returned a reason above
    if label < 0 or (rules.num_labels is not None and label >= rules.num_labels):
        return "unknown_label"
    return Example(None, text, label, f"{label}{_SEP}{text}", len(text))
