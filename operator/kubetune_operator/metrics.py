"""Prometheus metrics of the operator: what the FineTuneJobs are doing, and how the operator is doing.

Why a module of its own with pure update functions: handlers stay thin (one call per event), the metric
names live in one place (the Helm chart's ServiceMonitor, the docs and the tests scrape them), and tests can
drive the functions without a cluster. Nothing here calls the Kubernetes API; `OperatorMetrics` keeps a small
in-memory index of the last status it saw per job so that gauges can be recomputed and one-off durations are
observed exactly once per transition.

Series (all prefixed `kubetune_`):

- `kubetune_finetunejobs{namespace, state}` gauge: jobs per `status.state` (Pending, Training, Suspended,
  Succeeded, Deploying, Deployed, Failed; `Unknown` before the first status).
- `kubetune_finetunejob_conditions{namespace, condition, status}` gauge: jobs whose condition `condition`
  currently has `status` (True/False/Unknown).
- `kubetune_reconcile_duration_seconds{handler}` histogram and `kubetune_reconcile_errors_total{handler,
  kind}` counter (kind: temporary, permanent, unexpected).
- `kubetune_time_to_training_start_seconds` histogram: creation -> `status.startTime`.
- `kubetune_training_duration_seconds{outcome}` histogram: `startTime` -> `completionTime` (outcome
  succeeded/failed).
- trainer progress mirrored per job, labelled `{namespace, job}`: `kubetune_job_progress_step`,
  `kubetune_job_progress_total_steps`, `kubetune_job_progress_ratio`, `kubetune_job_training_loss`,
  `kubetune_job_eval_loss`, `kubetune_job_tokens_per_second`, `kubetune_job_eta_seconds`. A job's series are
  removed when the job is forgotten (deleted), so label cardinality follows the live jobs.

After an operator restart the index is empty: the first sighting of a job seeds the index without observing
the one-off histograms, so a restart never counts a job's training start or duration twice.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server

__all__ = [
    "OperatorMetrics",
    "METRICS",
    "observe_job",
    "forget_job",
    "observe_reconcile",
    "record_error",
    "time_reconcile",
    "serve",
]

UNKNOWN_STATE = "Unknown"
# Training and waiting times of fine-tunes range from seconds (tests) to days.
_LONG_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400, 259200, float("inf"))
_RECONCILE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, float("inf"))

_PROGRESS_GAUGES = {
    # metric suffix: (status.progress key, help)
    "job_progress_step": ("step", "Optimizer steps done, as reported by the trainer."),
    "job_progress_total_steps": ("totalSteps", "Optimizer steps planned."),
    "job_progress_ratio": ("percent", "Share of planned steps done (0-1)."),
    "job_training_loss": ("loss", "Recent training loss."),
    "job_eval_loss": ("evalLoss", "Latest evaluation loss."),
    "job_tokens_per_second": ("tokensPerSecond", "Training throughput over all workers (tokens/s)."),
    "job_eta_seconds": ("etaSeconds", "Estimated seconds of training left."),
}


@dataclass(frozen=True)
class _Snapshot:
    state: str
    conditions: tuple[tuple[str, str], ...]  # (type, status)
    start_time: str | None
    completion_time: str | None


def _parse_time(value: Any) -> float | None:
    """RFC 3339 (as Kubernetes writes it, with Z) -> epoch seconds; None when absent or unparsable."""
    if not value or not isinstance(value, str):
        return None
    try:
        return datetime.fromisoformat(value.replace("Z", "+00:00")).timestamp()
    except ValueError:
        return None


def _snapshot(status: Mapping[str, Any] | None) -> _Snapshot:
    status = status or {}
    # Interned: thousands of jobs share a handful of state and condition strings (one copy each, not one per job).
    conditions = tuple(
        (sys.intern(str(c.get("type"))), sys.intern(str(c.get("status", "Unknown"))))
        for c in status.get("conditions") or []
        if isinstance(c, Mapping) and c.get("type")
    )
    return _Snapshot(
        state=sys.intern(str(status.get("state") or UNKNOWN_STATE)),
        conditions=conditions,
        start_time=status.get("startTime"),
        completion_time=status.get("completionTime"),
    )


def _outcome(snap: _Snapshot) -> str:
    conds = dict(snap.conditions)
    if conds.get("Failed") == "True" or snap.state == "Failed":
        return "failed"
    return "succeeded"


class OperatorMetrics:
    """All operator metrics in their own registry (never the process-global default one)."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry(auto_describe=True)
        r = self.registry
        self.jobs = Gauge("kubetune_finetunejobs", "FineTuneJobs by status.state.", ["namespace", "state"], registry=r)
        self.conditions = Gauge(
            "kubetune_finetunejob_conditions",
            "FineTuneJobs whose condition has the given status.",
            ["namespace", "condition", "status"],
            registry=r,
        )
        self.reconcile_duration = Histogram(
            "kubetune_reconcile_duration_seconds",
            "Time spent in one reconcile handler call.",
            ["handler"],
            buckets=_RECONCILE_BUCKETS,
            registry=r,
        )
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors",
            "Handler calls that raised (kind: temporary, permanent, unexpected).",
            ["handler", "kind"],
            registry=r,
        )
        self.time_to_training_start = Histogram(
            "kubetune_time_to_training_start_seconds",
            "From the FineTuneJob's creation to status.startTime (queueing, image pulls, data checks).",
            buckets=_LONG_BUCKETS,
            registry=r,
        )
        self.training_duration = Histogram(
            "kubetune_training_duration_seconds",
            "From status.startTime to status.completionTime.",
            ["outcome"],
            buckets=_LONG_BUCKETS,
            registry=r,
        )
        self.progress = {
            suffix: Gauge(f"kubetune_{suffix}", help_, ["namespace", "job"], registry=r)
            for suffix, (_, help_) in _PROGRESS_GAUGES.items()
        }
        self._lock = threading.Lock()
        self._index: dict[tuple[str, str], _Snapshot] = {}
        self._progress_keys: dict[tuple[str, str], set[str]] = {}
        # Jobs per label set, kept up to date one job at a time: a recount over every job on each event would
        # make a burst of N new jobs cost O(N^2).
        self._job_counts: dict[tuple[str, str], int] = {}
        self._cond_counts: dict[tuple[str, str, str], int] = {}

    # --- jobs ----------------------------------------------------------------------------------------

    def observe_job(
        self,
        namespace: str,
        name: str,
        status: Mapping[str, Any] | None,
        *,
        created: str | None = None,
    ) -> None:
        """Record a job's current status (call after every status write, and on resume/startup).

        `created` is metadata.creationTimestamp; with it, the first time a job's `startTime` appears the
        creation -> start time is observed. Completion observes the training duration once.
        """
        snap = _snapshot(status)
        key = (namespace, name)
        with self._lock:
            before = self._index.get(key)
            self._index[key] = snap
            if before is not None:
                self._observe_transitions(before, snap, created)
            if before != snap:
                self._count(namespace, before, -1)
                self._count(namespace, snap, +1)
            self._mirror_progress(key, (status or {}).get("progress"))

    def _observe_transitions(self, before: _Snapshot, after: _Snapshot, created: str | None) -> None:
        if not before.start_time and after.start_time:
            start, born = _parse_time(after.start_time), _parse_time(created)
            if start is not None and born is not None:
                self.time_to_training_start.observe(max(0.0, start - born))
        if not before.completion_time and after.completion_time:
            start, end = _parse_time(after.start_time), _parse_time(after.completion_time)
            if start is not None and end is not None:
                self.training_duration.labels(outcome=_outcome(after)).observe(max(0.0, end - start))

    def forget_job(self, namespace: str, name: str) -> None:
        """The job is gone (deleted): drop it from the counts and remove its per-job series."""
        key = (namespace, name)
        with self._lock:
            self._count(namespace, self._index.pop(key, None), -1)
            self._mirror_progress(key, None)

    def _count(self, namespace: str, snap: _Snapshot | None, sign: int) -> None:
        """Add (+1) or take away (-1) one job's snapshot from the gauges. Label sets that drop to zero stay,
        set to 0 (not removed), so dashboards see the fall."""
        if snap is None:
            return
        labels = (namespace, snap.state)
        self._job_counts[labels] = self._job_counts.get(labels, 0) + sign
        self.jobs.labels(*labels).set(self._job_counts[labels])
        for ctype, cstatus in set(snap.conditions):
            clabels = (namespace, ctype, cstatus)
            self._cond_counts[clabels] = self._cond_counts.get(clabels, 0) + sign
            self.conditions.labels(*clabels).set(self._cond_counts[clabels])

    def _mirror_progress(self, key: tuple[str, str], progress: Mapping[str, Any] | None) -> None:
        seen = self._progress_keys.pop(key, set())
        now: set[str] = set()
        for suffix, (field, _) in _PROGRESS_GAUGES.items():
            value = (progress or {}).get(field)
            if isinstance(value, bool) or not isinstance(value, (int, float)):
                continue
            if field == "percent":
                value = value / 100.0
            self.progress[suffix].labels(*key).set(float(value))
            now.add(suffix)
        for suffix in seen - now:
            with contextlib.suppress(KeyError):
                self.progress[suffix].remove(*key)
        if now:
            self._progress_keys[key] = now

    def job_count(self, namespace: str | None = None, state: str | None = None) -> int:
        """How many known jobs match (for tests and debugging)."""
        with self._lock:
            return sum(
                1
                for (ns, _), s in self._index.items()
                if (namespace is None or ns == namespace) and (state is None or s.state == state)
            )

    # --- reconciles ----------------------------------------------------------------------------------

    def observe_reconcile(self, handler: str, seconds: float) -> None:
        self.reconcile_duration.labels(handler=handler).observe(max(0.0, seconds))

    def record_error(self, handler: str, kind: str = "unexpected") -> None:
        """kind: temporary (kopf.TemporaryError, retried), permanent (kopf.PermanentError), unexpected."""
        self.reconcile_errors.labels(handler=handler, kind=kind).inc()

    @contextlib.contextmanager
    def time_reconcile(self, handler: str) -> Iterator[None]:
        """Time a handler body; an exception is counted (by its class name's kind) and re-raised."""
        t0 = time.perf_counter()
        try:
            yield
        except BaseException as e:
            self.record_error(handler, _error_kind(e))
            raise
        finally:
            self.observe_reconcile(handler, time.perf_counter() - t0)

    # --- serving -------------------------------------------------------------------------------------

    def serve(self, port: int, host: str = "127.0.0.1") -> Any:
        """Serve /metrics on host:port in a daemon thread; returns the server (call .shutdown() to stop)."""
        server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return server


def _error_kind(exc: BaseException) -> str:
    names = {cls.__name__ for cls in type(exc).__mro__}
    if "TemporaryError" in names:
        return "temporary"
    if "PermanentError" in names:
        return "permanent"
    return "unexpected"


# The process's metrics: what the handlers update and the metrics server serves.
METRICS = OperatorMetrics()


def observe_job(namespace: str, name: str, status: Mapping[str, Any] | None, *, created: str | None = None) -> None:
    METRICS.observe_job(namespace, name, status, created=created)


def forget_job(namespace: str, name: str) -> None:
    METRICS.forget_job(namespace, name)


def observe_reconcile(handler: str, seconds: float) -> None:
    METRICS.observe_reconcile(handler, seconds)


def record_error(handler: str, kind: str = "unexpected") -> None:
    METRICS.record_error(handler, kind)


def time_reconcile(handler: str) -> contextlib.AbstractContextManager[None]:
    return METRICS.time_reconcile(handler)


def serve(port: int, host: str = "127.0.0.1") -> Any:
    return METRICS.serve(port, host)
