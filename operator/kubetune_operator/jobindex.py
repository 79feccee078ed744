"""The live FineTuneJobs the operator has seen, by output prefix: what the guard's overlap check reads.

Why an index and not a LIST: the check (`guards.overlapping_job`) runs for every new job; listing every job
for it costs one request and O(N) bytes per new job, O(N^2) for a burst of N (5,000 jobs: gigabytes parsed).
The index is fed by the FineTuneJob watch the operator runs anyway (`handlers.job_event`), keeps only live jobs
(a Succeeded or Failed job can no longer conflict) and only what the check reads, and answers "which jobs
nest with this output prefix" in O(log N + depth of the prefix).

Like any controller's cache it may lag the API server by the events in flight: two nesting jobs created in the
same instant may both start (the older-job-wins rule holds for every job seen before).
"""

from __future__ import annotations

import bisect
import threading
from typing import Any

from kubetune_operator import conditions as c
from kubetune_operator.guards import output_base

_META_KEYS = ("name", "namespace", "uid", "creationTimestamp")


class LiveJobs:
    """uid -> (output base, slim job); thread-safe."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._by_uid: dict[str, tuple[str, dict[str, Any]]] = {}
        self._bases: list[tuple[str, str]] = []  # sorted (output base, uid)

    def __len__(self) -> int:
        return len(self._by_uid)

    def observe(self, body: dict[str, Any]) -> None:
        """A FineTuneJob as the watch delivered it."""
        meta = body.get("metadata") or {}
        uid = meta.get("uid") or ""
        uri = ((body.get("spec") or {}).get("output") or {}).get("uri")
        conds = (body.get("status") or {}).get("conditions") or []
        if (
            not uid
            or not isinstance(uri, str)
            or meta.get("deletionTimestamp")
            or c.is_true(conds, c.SUCCEEDED)
            or c.is_true(conds, c.FAILED)
        ):
            self.forget(uid)
            return
        base = output_base(uri, meta.get("namespace", ""), meta.get("name", ""))
        slim = {"metadata": {k: meta.get(k) for k in _META_KEYS}, "spec": {"output": {"uri": uri}}}
        with self._lock:
            old = self._by_uid.get(uid)
            if old is not None and old[0] != base:
                self._drop(uid, old[0])
            if old is None or old[0] != base:
                bisect.insort(self._bases, (base, uid))
            self._by_uid[uid] = (base, slim)

    def forget(self, uid: str) -> None:
        with self._lock:
            old = self._by_uid.pop(uid, None)
            if old is not None:
                self._drop(uid, old[0])

    def _drop(self, uid: str, base: str) -> None:
        i = bisect.bisect_left(self._bases, (base, uid))
        if i < len(self._bases) and self._bases[i] == (base, uid):
            del self._bases[i]

    def nesting(self, base: str) -> list[dict[str, Any]]:
        """Live jobs whose output base is a prefix of `base` or has `base` as a prefix (bases end in '/')."""
        found: dict[str, dict[str, Any]] = {}
        with self._lock:
            # Theirs a prefix of ours: theirs is one of our '/'-terminated prefixes.
            for i, ch in enumerate(base):
                if ch == "/":
                    self._collect(base[: i + 1], base[: i + 1], found)
            # Ours a prefix of theirs: the sorted range of bases that start with ours.
            self._collect(base, base + "\U0010ffff", found)
        return list(found.values())

    def _collect(self, low: str, high: str, found: dict[str, dict[str, Any]]) -> None:
        i = bisect.bisect_left(self._bases, (low, ""))
        while i < len(self._bases) and self._bases[i][0] <= high and self._bases[i][0].startswith(low):
            uid = self._bases[i][1]
            found[uid] = self._by_uid[uid][1]
            i += 1
