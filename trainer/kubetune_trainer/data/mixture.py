"""Mixing several training sources by weight: which source the next record is read from.

The sources are interleaved by smooth weighted round-robin over the examples each has contributed: the next
record comes from the source furthest below its share (weight / total weight) of the examples kept so far, so
after n kept examples every source is within one example of its share. Counting kept examples rather than raw
records keeps the mix true when one source has more invalid or filtered records than another. Reading stops when
the first source runs out (Hugging Face `interleave_datasets`' "first_exhausted"): going on would change the mix,
and repeating a small source would make it an extra epoch of that source. Records of the other sources left
unread are logged.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any

log = logging.getLogger(__name__)


class Mixture:
    """The deficit bookkeeping for sources with the given weights."""

    def __init__(self, weights: list[float]):
        if not weights or any(w <= 0 for w in weights):
            raise ValueError("every source needs a positive weight")
        total = sum(weights)
        self.shares = [w / total for w in weights]
        self.kept = [0] * len(weights)

    def pick(self) -> int:
        """The source to read next: the largest deficit against its share, the first such on ties."""
        n = sum(self.kept) + 1
        deficits = [share * n - k for share, k in zip(self.shares, self.kept)]
        return max(range(len(deficits)), key=lambda i: (deficits[i], -i))

    def took(self, source: int) -> None:
        self.kept[source] += 1


def consume(
    streams: list[Iterator[Any]], weights: list[float], accept: Callable[[int, Any], bool]
) -> tuple[list[int], int | None]:
    """Feed records to accept(source, record) in mixture order until a source runs out.

    accept returns whether the record was kept (counted towards its source's share). Returns the kept count
    per source and the index of the source that ran out first (None if there were no sources).
    """
    mix = Mixture(weights)
    if len(streams) == 1:  # a single source: no bookkeeping, read it all
        for record in streams[0]:
            if accept(0, record):
                mix.took(0)
        return mix.kept, 0
    while True:
        i = mix.pick()
        record = next(streams[i], _END)
        if record is _END:
            return mix.kept, i
        if accept(i, record):
            mix.took(i)


_END = object()
