"""Duplicate removal: exact (hash of the normalised content) and near (MinHash LSH from datasketch).

Memory grows with the number of kept records, not with their size: the exact set holds one 64-bit hash per
record, the LSH index and the kept signatures about 2 KB per
record (128 permutations). Near-dedup is therefore meant for
datasets up to a few million records per job; beyond that, deduplicate upstream.
"""

from __future__ import annotations

import hashlib

from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
SHINGLE_CHARS = 5


def content_hash(content: str) -> int:
    """A stable 64-bit hash of normalised content (Python's hash() is salted per process, so it is unusable
    for anything that must agree between runs)."""
    return int.from_bytes(hashlib.blake2b(content.encode("utf-8"), digest_size=8).digest(), "little")


class ExactDedup:
    def __init__(self) -> None:
        self._seen: set[int] = set()

    def is_duplicate(self, h: int) -> bool:
        """True if h was seen before; otherwise remember it."""
        if h in self._seen:
            return True
        self._seen.add(h)
        return False


def shingles(content: str) -> list[bytes]:
    """Character 5-grams of the lower-cased content with whitespace collapsed.

    Character shingles rather than word n-grams because records are often short (a sentence or two), where
    word 3-grams give too few shingles for a stable Jaccard estimate.
    """
    s = " ".join(content.lower().split())
    if len(s) <= SHINGLE_CHARS:
        return [s.encode("utf-8")]
    return list({s[i:i + SHINGLE_CHARS].encode("utf-8") for i in range(len(s) - SHINGLE_CHARS + 1)})


class NearDedup:
    """Drops a record whose estimated Jaccard similarity to an earlier kept record reaches the threshold."""

    def __init__(self, threshold: float, seed: int = 1) -> None:
        self._threshold = threshold
        self._lsh = MinHashLSH(threshold=threshold, num_perm=NUM_PERM)
        self._seed = seed
        # LSH returns candidates that merely share a band; keeping each signature lets a candidate be confirmed
        # by its estimated Jaccard, so a record is dropped only when it really reaches the threshold.
        self._signatures: list[MinHash] = []

    def is_duplicate(self, content: str) -> bool:
        m = MinHash(num_perm=NUM_PERM, seed=self._seed)
        m.update_batch(shingles(content))
        for key in self._lsh.query(m):
            if m.jaccard(self._signatures[key]) >= self._threshold:
                return True
        self._lsh.insert(len(self._signatures), m, check_duplication=False)
        self._signatures.append(m)
        return False
