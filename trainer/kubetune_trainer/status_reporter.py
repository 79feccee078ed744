"""Rank 0's reports: the FineTuneJob status (progress, data, checkpoints, evaluation, model) and metrics.jsonl
in S3.

Two rules shape this module:
- Reporting never fails or stalls training. Patches and uploads run on a background thread; the training
  thread only merges fields into a pending dict. A refused or timed-out patch is logged and the next one
  carries the fields again (the pending dict is kept until a patch succeeds).
- The API server is not flooded: progress patches go out at most once per `reporting.minIntervalSeconds`,
  coalesced. Data statistics, checkpoints, the evaluation and the model are rare and important, so they go
  out at once.

Patches are JSON merge patches of the status subresource (`status.progress` merges key by key; lists such as
`status.checkpoints` are replaced whole). The ServiceAccount token comes from the pod (in-cluster config), or
from KUBECONFIG when that is set (tests, local runs).

metrics.jsonl is the history that outlives the cluster: one JSON object per line (per step, per evaluation,
per event). S3 has no append, so the whole object is rewritten from memory every METRICS_FLUSH_SECONDS and
at the end. On resume the lines of steps after the checkpoint (work that is about to be redone) are dropped.

With spec.tracking.mlflow the same figures also go to an MLflow tracking server (kubetune_trainer.tracking): the
step lines of metrics.jsonl, the data statistics, the evaluation and the model, under the same two rules.

Local runs (`kubetune run`) have no API server to patch and want more than a 30 s flush: when
KUBETUNE_PROGRESS_FILE names a file on the worker's machine, every status update and metrics line is also
appended to it at once, one JSON object per line: {"status": {<key>: <value>}} or {"metric": {...}}.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

from kubetune.api import (
    GROUP,
    PLURAL,
    VERSION,
    CheckpointRef,
    DataStats,
    EvaluationSummary,
    ModelArtifact,
    Progress,
    Restart,
    StartupTimes,
    TrainerConfig,
    TrialStatus,
)
from kubetune.clock import now_rfc3339
from kubetune_trainer import storage
from kubetune_trainer.tracking import start_tracking

log = logging.getLogger(__name__)

METRICS_FLUSH_SECONDS = 30.0
PROGRESS_FILE_ENV = "KUBETUNE_PROGRESS_FILE"
_PATCH_TIMEOUT = (5, 15)  # connect, read seconds: a hung API server must not hold reports back for long


def kube_status_api(kubeconfig: str | None = None) -> Any | None:
    """CustomObjectsApi from `kubeconfig` (else $KUBECONFIG) or the pod's ServiceAccount; None when neither."""
    from kubernetes import client, config

    from kubetune import kubeclient

    kubeconfig = kubeconfig or os.environ.get("KUBECONFIG")
    try:
        # The kubeconfig is named explicitly: the client reads $KUBECONFIG only once, when it is first imported.
        configuration = kubeclient.load_configuration(kubeconfig or None, default_kubeconfig=False)
    except config.ConfigException as exc:
        log.warning("status reporting is off: no KUBECONFIG and no in-cluster ServiceAccount (%s)", exc)
        return None
    return client.CustomObjectsApi(client.ApiClient(configuration))


def _open_progress_file() -> Any:
    path = os.environ.get(PROGRESS_FILE_ENV)
    if not path:
        return None
    try:
        return open(path, "a", encoding="utf-8")  # closed by Reporter.close()
    except OSError as exc:
        log.warning("cannot append progress to %s (%s)", path, exc.strerror)
        return None


def _clean(value: Any) -> Any:
    """JSON cannot carry NaN or infinity (and the API server refuses them): report them as null."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clean(v) for v in value]
    return value


class Reporter:
    """Status patches and metrics history for one run. Create on rank 0 only; call close() at the end."""

    def __init__(self, cfg: TrainerConfig, s3: Any, *, resumed_step: int | None = None, kubeconfig: str | None = None):
        self._cfg = cfg
        self._s3 = s3
        self._api = kube_status_api(kubeconfig) if cfg.reporting.kubernetes else None
        self._interval = cfg.reporting.min_interval_seconds
        self._lock = threading.Condition()
        self._pending: dict[str, Any] = {}
        self._urgent = False
        self._last_patch = -math.inf
        self._backoff_until = 0.0
        self._failures = 0
        self._uid_checked = False
        self.patches_sent = 0
        self._lines = self._load_history(resumed_step)
        self._metrics_dirty = bool(self._lines)
        self._last_metrics_flush = time.monotonic()
        self._closed = False
        self.trial: str | None = None  # set by for_trial()
        self._local = _open_progress_file()
        self._tracking = start_tracking(cfg)  # None without spec.tracking
        self._thread = threading.Thread(target=self._run, name="kubetune-reporter", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- what the training loop calls

    def progress(self, **fields: Any) -> None:
        """Progress fields by their Python names (step=, loss=, eval_loss=, ...); sent rate-limited."""
        if self.trial is not None:  # a tuning trial's figures; the tuning driver owns percent and ETA
            fields = {k: v for k, v in fields.items() if k not in ("percent", "eta_seconds")}
            fields["trial"] = self.trial
        wire = Progress(updated_at=now_rfc3339(), **_clean(fields)).wire()
        self._mirror({"status": {"progress": wire}})
        with self._lock:
            self._pending.setdefault("progress", {}).update(wire)
            self._lock.notify()

    def data(self, stats: dict[str, Any]) -> None:
        """status.data from the data side's statistics (DataStats wire names); sent at once."""
        wire = DataStats.model_validate(_clean(stats)).wire()
        self._urgent_update("data", wire)
        if self._tracking:
            self._tracking.data(wire)

    def checkpoints(self, refs: list[CheckpointRef]) -> None:
        if self.trial is None:  # a trial's checkpoints are its own (under <run>/trials/<id>/)
            self._urgent_update("checkpoints", [r.wire() for r in refs])

    def startup(self, times: dict[str, float]) -> None:
        """status.startup: where the time before the first step went (StartupTimes wire names); sent at once."""
        if self.trial is None:  # a trial's startup is in its metrics lines only
            self._urgent_update("startup", StartupTimes.model_validate(_clean(times)).wire())

    def restarts(self, records: list[Restart]) -> None:
        """status.restarts: every restart of this run with its cause (a trial's are named by progress.trial)."""
        if records and self.trial is None:
            self._urgent_update("restarts", [r.wire() for r in records])

    def model(self, artifact: ModelArtifact) -> None:
        if self._tracking:  # a trial's run logs its own model
            self._tracking.model(artifact)
        if self.trial is None:  # the tuning driver reports the job's model: the best trial's
            self._urgent_update("model", artifact.wire())

    # ---------------------------------------------------------------- evaluation and tuning (kubetune_trainer.evaluate, .tune)

    def for_trial(self, trial_id: str) -> None:
        """Report as tuning trial `trial_id`: progress carries progress.trial (without percent/ETA, which the
        tuning driver computes across trials); checkpoints, model and evaluation are left to the driver."""
        self.trial = trial_id
        if self._tracking:
            self._tracking.trial(trial_id)

    def evaluation(self, summary: EvaluationSummary) -> None:
        """status.evaluation (base vs fine-tuned on the held-out data); sent at once."""
        if self._tracking:
            self._tracking.evaluation(summary)
        if self.trial is None:
            self._urgent_update("evaluation", _clean(summary.wire()))

    def trials(self, trials: list[TrialStatus], best: str | None) -> None:
        """status.trials and status.bestTrial (the tuning driver's); sent at once."""
        self._urgent_update("trials", [_clean(t.wire()) for t in trials])
        if best is not None:
            self._urgent_update("bestTrial", best)

    def metric(self, record: dict[str, Any]) -> None:
        """One line of metrics.jsonl (a step, an evaluation or an event)."""
        line = json.dumps(_clean({"time": now_rfc3339(), **record}), sort_keys=True)
        self._mirror({"metric": json.loads(line)})
        if self._tracking:
            self._tracking.record(record)
        with self._lock:
            self._lines.append(line)
            self._metrics_dirty = True

    def close(self, timeout: float = 30.0) -> None:
        """Send what is pending and upload metrics.jsonl, waiting at most `timeout` seconds."""
        with self._lock:
            self._closed = True
            self._urgent = True
            self._backoff_until = 0.0
            self._lock.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("status reporter did not finish within %.0fs; the last report may be missing", timeout)
        if self._local is not None:
            self._local.close()
            self._local = None
        if self._tracking:
            self._tracking.close(timeout=min(timeout, 15.0))
            self._tracking = None

    # ---------------------------------------------------------------- background thread

    def _mirror(self, obj: dict[str, Any]) -> None:
        """Append to the local progress file, if any (best effort, like every report)."""
        if self._local is None:
            return
        try:
            self._local.write(json.dumps(obj, sort_keys=True) + "\n")
            self._local.flush()
        except (OSError, ValueError):
            pass

    def _urgent_update(self, key: str, value: Any) -> None:
        self._mirror({"status": {key: value}})
        with self._lock:
            self._pending[key] = value
            self._urgent = True
            self._lock.notify()

    def _run(self) -> None:
        while True:
            with self._lock:
                while True:
                    now = time.monotonic()
                    patch_at = max(self._backoff_until, now if self._urgent else self._last_patch + self._interval)
                    send = bool(self._pending) and now >= patch_at
                    flush = self._metrics_dirty and (
                        self._closed or now - self._last_metrics_flush >= METRICS_FLUSH_SECONDS
                    )
                    done = self._closed and not self._pending and not self._metrics_dirty
                    if send or flush or done:
                        break
                    timeout = METRICS_FLUSH_SECONDS / 3
                    if self._pending:
                        timeout = min(timeout, patch_at - now)
                    self._lock.wait(max(0.01, timeout))
                if done:
                    return
                body = dict(self._pending) if send else None
                lines = list(self._lines) if flush else None
                closing = self._closed
            if body is not None:
                ok = self._patch(body)
                with self._lock:
                    self._last_patch = time.monotonic()
                    if ok:
                        for key, value in body.items():  # keep fields that changed while the patch ran
                            if self._pending.get(key) == value:
                                del self._pending[key]
                        self._urgent = False
                        self._backoff_until = 0.0
                    elif closing:
                        self._pending.clear()  # the last try was made; do not retry forever at shutdown
                    else:  # the API server refused or is away: retry later, not in a tight loop
                        self._backoff_until = self._last_patch + max(5.0, self._interval)
            if lines is not None:
                self._flush_metrics(lines)

    def _patch(self, status: dict[str, Any]) -> bool:
        if self._api is None:
            return True
        job = self._cfg.job
        try:
            if not self._uid_checked:
                self._check_uid()
            if self._api is None:
                return True
            self._api.patch_namespaced_custom_object_status(
                GROUP,
                VERSION,
                job.namespace,
                PLURAL,
                job.name,
                {"status": status},
                _content_type="application/merge-patch+json",
                _request_timeout=_PATCH_TIMEOUT,
            )
        except Exception as exc:  # noqa: BLE001 - a failed report must never fail training
            self._failures += 1
            if self._failures <= 3 or self._failures % 50 == 0:
                # Only the status and reason: an exception's full text can carry request headers.
                code = getattr(exc, "status", None)
                reason = getattr(exc, "reason", None) or type(exc).__name__
                log.warning(
                    "status patch of %s/%s failed (%s %s; failure %d); training continues",
                    job.namespace,
                    job.name,
                    code or "",
                    reason,
                    self._failures,
                )
            return False
        self.patches_sent += 1
        return True

    def _check_uid(self) -> None:
        """Report only into the FineTuneJob this run belongs to, not a newer one that reuses its name.

        The status subresource ignores metadata in a patch, so a uid there is no precondition; the job is
        read once instead, and reporting stops if it is a different object.
        """
        job = self._cfg.job
        if job.uid:
            assert self._api is not None  # only _patch calls this, after checking
            current = self._api.get_namespaced_custom_object(
                GROUP, VERSION, job.namespace, PLURAL, job.name, _request_timeout=_PATCH_TIMEOUT
            )
            uid = (current.get("metadata") or {}).get("uid")
            if uid != job.uid:
                log.warning(
                    "FineTuneJob %s/%s is a different object now (uid %s, this run's is %s); status reporting is off",
                    job.namespace,
                    job.name,
                    uid,
                    job.uid,
                )
                self._api = None
        self._uid_checked = True

    def _flush_metrics(self, lines: list[str]) -> None:
        try:
            storage.put_bytes(
                self._s3, self._cfg.metrics_uri, ("\n".join(lines) + "\n").encode(), content_type="application/x-ndjson"
            )
        except Exception as exc:  # noqa: BLE001 - history is best effort; training goes on
            log.warning("could not write %s (%s); will retry", self._cfg.metrics_uri, type(exc).__name__)
            with self._lock:
                self._last_metrics_flush = time.monotonic()
                if self._closed:
                    self._metrics_dirty = False
            return
        with self._lock:
            self._last_metrics_flush = time.monotonic()
            if len(self._lines) == len(lines):
                self._metrics_dirty = False

    def _load_history(self, resumed_step: int | None) -> list[str]:
        """Earlier attempts' lines up to the resumed step (later ones describe work that will be redone)."""
        if resumed_step is None:
            return []
        try:
            raw = storage.get_bytes(self._s3, self._cfg.metrics_uri)
        except Exception as exc:  # noqa: BLE001 - history is best effort; training goes on
            log.warning("could not read earlier metrics (%s); starting a new history", type(exc).__name__)
            return []
        kept = []
        for line in (raw or b"").decode().splitlines():
            try:
                step = json.loads(line).get("step")
            except ValueError:
                continue
            if step is None or step <= resumed_step:
                kept.append(line)
        kept.append(json.dumps({"time": now_rfc3339(), "event": "resumed", "step": resumed_step}))
        return kept
