"""Text cleanup applied to every text field before dedup, filtering and tokenisation."""

from __future__ import annotations

import re
import unicodedata

# Horizontal whitespace other than the plain space; newlines carry structure (paragraphs, code) and are
# handled separately.
_ODD_SPACE = "\t\f\v\u00a0\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a\u202f\u205f\u3000"
_H = " " + _ODD_SPACE
# A run after a non-space character that is not already a single plain space.
_INNER_SPACE = re.compile(rf"(?<=\S)(?: [{_H}]+|[{_ODD_SPACE}][{_H}]*)")
_TRAILING_SPACE = re.compile(rf"[{_H}]+$", re.MULTILINE)
_MANY_NEWLINES = re.compile(r"\n{3,}")
_ODD_CHAR = re.compile(f"[{_ODD_SPACE}]")


def normalize_text(text: str, form: str, whitespace: bool) -> str:
    """Unicode-normalise (NFC/NFKC/none) and, if asked, clean whitespace.

    Whitespace cleanup: unify line endings, drop trailing spaces on each line, collapse runs of spaces and tabs
    inside a line to one space, keep a line's leading indentation (code samples stay valid), keep at most one
    blank line between paragraphs, and strip the text's ends.
    """
    if form != "none":
        text = unicodedata.normalize(form, text)  # type: ignore[arg-type]  # form is one of NFC/NFD/NFKC/NFKD (API enum)
    if not whitespace:
        return text
    # Each regex pass costs tens of microseconds per KB in Python's engine, far more than the substring
    # checks (memchr-speed) that show whether a pass can change anything; most texts need none.
    if "\r" in text:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    odd = "  " in text or _ODD_CHAR.search(text) is not None  # one scan, not one per odd character
    if odd or " \n" in text:
        text = _TRAILING_SPACE.sub("", text)
    if odd:
        text = _INNER_SPACE.sub(" ", text)
    if "\n\n\n" in text:
        text = _MANY_NEWLINES.sub("\n\n", text)
    # The text's own ends are stripped fully: indentation before the first line is layout, not content.
    return text.strip()
