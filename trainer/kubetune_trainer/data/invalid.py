"""Invalid records: the reasons, the per-reason tally with one sample location each, and the threshold check."""

from __future__ import annotations

from kubetune_trainer.data.errors import DataError

# The vocabulary of reasons, in the order a record is checked. Status and stats.json use these names.
REASONS: dict[str, str] = {
    "bad_encoding": "the line is not valid UTF-8, or a text holds a lone surrogate escape (\\ud800) UTF-8 cannot carry",
    "bad_json": "the line is not valid JSON",
    "not_an_object": "the line is valid JSON but not an object",
    "missing_field": "a required field is absent or null",
    "wrong_type": "a field has the wrong type (e.g. a number where text is expected)",
    "empty_text": "a required text is empty after normalisation",
    "unknown_role": "a chat message's role is not system, user or assistant",
    "no_assistant_turn": "a chat has no assistant message to learn from",
    "unknown_label": "a classification label is not one of the configured classes",
    "control_token": "a chat or instruction text contains one of the tokenizer's control tokens (e.g. <|im_end|>)",
    "same_responses": "a preference record's chosen and rejected responses are the same",
}

# What to tell the user to do, for reasons whose fix is in the job spec rather than the data.
_HINTS = {
    "missing_field": "check spec.dataset.fields",
    "unknown_label": "check spec.dataset.labels and spec.model.numLabels",
    "wrong_type": "check spec.dataset.format and spec.dataset.fields",
}


class InvalidTally:
    """Counts invalid records by reason and remembers the first location of each (file + line or row)."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}
        self.samples: dict[str, str] = {}

    def add(self, reason: str, location: str) -> None:
        assert reason in REASONS, reason
        self.counts[reason] = self.counts.get(reason, 0) + 1
        self.samples.setdefault(reason, location)

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    def check(self, records: int, max_fraction: float) -> None:
        """Raise DataError when the invalid share is above max_fraction, naming the reasons, most frequent
        first, each with a sample location."""
        if records == 0 or self.total / records <= max_fraction:
            return
        parts = []
        for reason, n in sorted(self.counts.items(), key=lambda kv: (-kv[1], kv[0])):
            hint = f"; {_HINTS[reason]}" if reason in _HINTS else ""
            parts.append(f"{reason}: {n} ({REASONS[reason]}; first at {self.samples[reason]}{hint})")
        raise DataError(
            f"{self.total} of {records} records ({self.total / records:.1%}) are invalid, above "
            f"preprocessing.maxInvalidFraction {max_fraction:.1%}. " + "; ".join(parts)
        )
