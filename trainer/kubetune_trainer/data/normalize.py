"""Text cleanup applied to every text field before dedup, filtering and tokenisation."""

from __future__ import annotations

import re
import unicodedata

# Horizontal whitespace only: newlines carry structure (paragraphs, code) and are handled separately.
_INNER_SPACE = re.compile(r"(?<=\S)[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+")
_TRAILING_SPACE = re.compile(r"[ \t\f\v\u00a0\u2000-\u200a\u202f\u205f\u3000]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile(r"\n{3,}")


def normalize_text(text: str, form: str, whitespace: bool) -> str:
    """Unicode-normalise (NFC/NFKC/none) and, if asked, clean whitespace.

    Whitespace cleanup: unify line endings, drop trailing spaces on each line, collapse runs of spaces and tabs
    inside a line to one space, keep a line's leading indentation (code samples stay valid), keep at most one
    blank line between paragraphs, and strip the text's ends.
    """
    if form != "none":
        text = unicodedata.normalize(form, text)
    if not whitespace:
        return text
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    text = _TRAILING_SPACE.sub("", text)
    text = _INNER_SPACE.sub(" ", text)
    text = _MANY_NEWLINES.sub("\n\n", text)
    # The text's own ends are stripped fully: indentation before the first line is layout, not content.
    return text.strip()
