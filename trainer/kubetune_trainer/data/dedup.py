"""Duplicate removal: exact (hash of the normalised content) and near (MinHash LSH from datasketch).

Memory grows with the number of kept records, not with their size: the exact set costs about 8 bytes per
record (sorted numpy runs, see HashSet64), the LSH index and kept signatures about 2 KB per record (128
permutations). Near-dedup is therefore meant for datasets up to a few million records per job; beyond that,
deduplicate upstream.
"""

from __future__ import annotations

import hashlib

import numpy as np
from datasketch import MinHash, MinHashLSH

NUM_PERM = 128
SHINGLE_CHARS = 5


def content_hash(content: str) -> int:
    """A stable 64-bit hash of normalised content (Python's hash() is salted per process, so it is unusable
    for anything that must agree between runs)."""
    return int.from_bytes(hashlib.blake2b(content.encode("utf-8"), digest_size=8).digest(), "little")


class HashSet64:
    """A set of 64-bit hashes at ~8 bytes each (a Python set of ints costs ~70), queried a batch at a time.

    Each batch's new hashes become a sorted uint64 run; runs of similar size are merged (a binary counter, as
    in an LSM tree), so there are at most about log2(n / batch) runs and each hash is merged O(log n) times.
    A batch lookup is one vectorised binary search per run.
    """

    def __init__(self) -> None:
        self._runs: list[np.ndarray] = []  # sorted, largest first

    def __len__(self) -> int:
        return sum(len(r) for r in self._runs)

    def check_and_add(self, hashes: np.ndarray) -> np.ndarray:
        """For a batch of uint64 hashes in record order: True where the hash was seen before (earlier in the
        set or earlier in this batch); all of them are then in the set."""
        hashes = np.asarray(hashes, dtype=np.uint64)
        dup = np.ones(len(hashes), dtype=bool)
        _, first = np.unique(hashes, return_index=True)
        dup[first] = False  # the first occurrence within the batch is the one kept
        for run in self._runs:
            i = np.minimum(np.searchsorted(run, hashes), len(run) - 1)
            dup |= run[i] == hashes
        new = np.sort(hashes[~dup])
        if len(new):
            while self._runs and len(self._runs[-1]) <= 2 * len(new):
                # Runs are disjoint and sorted: a stable sort (timsort) of the two merges them in linear time.
                new = np.sort(np.concatenate([self._runs.pop(), new]), kind="stable")
            self._runs.append(new)
        return dup


def shingles(content: str) -> list[bytes]:
    """Character 5-grams of the lower-cased content with whitespace collapsed.

    Character shingles rather than word n-grams because records are often short (a sentence or two), where
    word 3-grams give too few shingles for a stable Jaccard estimate.
    """
    s = " ".join(content.lower().split())
    if len(s) <= SHINGLE_CHARS:
        return [s.encode("utf-8")]
    return list({s[i : i + SHINGLE_CHARS].encode("utf-8") for i in range(len(s) - SHINGLE_CHARS + 1)})


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
        return self.is_duplicate_signature(signature(content, self._seed))

    def is_duplicate_signature(self, hashvalues: np.ndarray) -> bool:
        """The check for a signature computed elsewhere (signature(), in parallel); the index itself is
        sequential, so the first of two near-duplicates in record order is the one kept."""
        m = MinHash(num_perm=NUM_PERM, seed=self._seed, hashvalues=hashvalues, scheme=_SCHEME)
        for key in self._lsh.query(m):
            if m.jaccard(self._signatures[key]) >= self._threshold:
                return True
        self._lsh.insert(len(self._signatures), m, check_duplication=False)
        self._signatures.append(m)
        return False


_SCHEME = MinHash(num_perm=1).scheme  # the default scheme of this datasketch, which signature() uses


def signature(content: str, seed: int = 1) -> np.ndarray:
    """The MinHash signature (NUM_PERM uint64 values) of a record's content."""
    m = MinHash(num_perm=NUM_PERM, seed=seed)
    m.update_batch(shingles(content))
    return np.asarray(m.hashvalues, dtype=np.uint64)
