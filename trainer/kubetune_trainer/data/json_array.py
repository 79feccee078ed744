"""An incremental parser for a JSON array file (Alpaca-style `.json`): one element at a time, never the whole file.

The standard library's json module only parses whole documents, so elements are cut out of a sliding text
buffer with JSONDecoder.raw_decode; the buffer holds at most the element being parsed plus one read chunk.
"""

from __future__ import annotations

import codecs
import json
from collections.abc import Iterator
from typing import IO, Any

from kubetune_trainer.data.errors import DataError

CHUNK_BYTES = 256 << 10
_WS = " \t\r\n"
_DECODER = json.JSONDecoder()


class _Text:
    """A UTF-8 text buffer over a binary stream, refilled on demand; pos is the parse position."""

    def __init__(self, stream: IO[bytes], uri: str):
        self.stream, self.uri = stream, uri
        self.decoder = codecs.getincrementaldecoder("utf-8")()
        self.buf, self.pos, self.eof = "", 0, False
        self.consumed = 0  # characters dropped from the front of buf (for error positions)

    def more(self) -> bool:
        """Append one chunk; False at the end of the stream."""
        if self.eof:
            return False
        chunk = self.stream.read(CHUNK_BYTES)
        try:
            text = self.decoder.decode(chunk, final=not chunk)
        except UnicodeDecodeError as exc:
            raise DataError(
                f"{self.uri} is not valid UTF-8 near character {self.consumed + len(self.buf)}: {exc.reason}"
            ) from None
        if self.pos > (1 << 20):  # drop what is parsed, now and then (not per element: that copies the buffer)
            self.consumed += self.pos
            self.buf, self.pos = self.buf[self.pos :], 0
        self.buf += text
        self.eof = not chunk
        return bool(chunk) or bool(text)

    def skip_ws(self) -> str:
        """The next non-whitespace character ('' at the end), without consuming it."""
        while True:
            while self.pos < len(self.buf) and self.buf[self.pos] in _WS:
                self.pos += 1
            if self.pos < len(self.buf):
                return self.buf[self.pos]
            if not self.more():
                return ""

    def where(self) -> str:
        return f"character {self.consumed + self.pos + 1}"


def iter_json_array(stream: IO[bytes], uri: str) -> Iterator[tuple[int, Any]]:
    """(1-based element number, value) for each element of the top-level array in `stream`.

    Raises DataError when the file is not one JSON array (the position and what was found are named); a
    syntax error inside the array cannot be skipped the way a bad JSONL line can, since nothing marks where
    the next element starts.
    """
    t = _Text(stream, uri)
    if t.skip_ws() == "\ufeff":  # a byte-order mark is an editor's artefact, not data
        t.pos += 1
    if (c := t.skip_ws()) != "[":
        raise DataError(f"{uri} is not a JSON array: it starts with {_found(c)}, not '['")
    t.pos += 1
    n = 0
    while True:
        c = t.skip_ws()
        if c == "]" and n == 0:
            t.pos += 1
            break
        if n:
            if c == "]":
                t.pos += 1
                break
            if c != ",":
                raise DataError(f"{uri}: expected ',' or ']' after element {n} at {t.where()}, found {_found(c)}")
            t.pos += 1
            t.skip_ws()
        value = _element(t, n + 1)
        n += 1
        yield n, value
    if t.skip_ws() != "":
        raise DataError(f"{uri}: data after the end of the JSON array at {t.where()}")


def _element(t: _Text, number: int) -> Any:
    while True:
        try:
            value, end = _DECODER.raw_decode(t.buf, t.pos)
        except json.JSONDecodeError as exc:
            # Incomplete in the buffer, or really malformed: only more text tells which.
            if t.more():
                continue
            raise DataError(
                f"{t.uri}: element {number} is not valid JSON at character {t.consumed + exc.pos + 1}: {exc.msg}"
            ) from None
        if end == len(t.buf) and t.more():
            continue  # a number or literal may go on in the next chunk ("12" of "123"): parse again
        t.pos = end
        return value


def _found(c: str) -> str:
    return "the end of the file" if not c else repr(c)
