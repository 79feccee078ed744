"""MLflow experiment tracking (spec.tracking.mlflow): rank 0's parameters, per-step metrics, evaluation and model
URI, logged to a tracking server beside the status and metrics.jsonl.

Rules:
- Tracking never fails or stalls training. Everything goes through a background thread: the training thread
  only appends to buffers. Requests have short timeouts and few retries (HTTP_DEFAULTS, unless the environment
  sets its own). A server that cannot be reached turns tracking off for the run, with one warning; a request
  the server refuses (e.g. a changed parameter) is dropped with one warning per kind, and tracking goes on.
- One MLflow run per run prefix: the run is tagged with the job's namespace, name, uid and run URI, and a
  restarted or resumed attempt finds its run by that URI and continues it (its metric history then holds the
  redone steps twice, at the same step numbers). A tuning trial is its own run, a child (mlflow.parentRunId)
  of the job's run, which the tuning driver logs the best trial's model and evaluation to.
- No secrets: parameters are the resolved model, data, training, tuning and resources settings without the
  names of Secrets; the tracking URL itself cannot carry credentials (the API refuses userinfo).

Only the client is needed (mlflow-skinny); it is imported on the background thread, so a slow import does not
delay the first step either.
"""

from __future__ import annotations

import json
import logging
import math
import os
import threading
import time
from typing import Any

from kubetune.api import EvaluationSummary, ModelArtifact, TrainerConfig

log = logging.getLogger(__name__)

FLUSH_SECONDS = 5.0
# Bounded requests: MLflow's defaults (120 s timeout, 7 retries with exponential backoff) could hold the
# background thread, and so the end of the run, for many minutes.
HTTP_DEFAULTS = {
    "MLFLOW_HTTP_REQUEST_TIMEOUT": "10",
    "MLFLOW_HTTP_REQUEST_MAX_RETRIES": "2",
    "MLFLOW_HTTP_REQUEST_BACKOFF_FACTOR": "1",
}
PARAM_SECTIONS = ("model", "dataset", "training", "tuning", "resources", "output")
# Names of Secrets (and the tracking settings themselves) are no training parameters.
UNLOGGED_KEYS = frozenset({"credentialsSecret", "tokenSecretRef", "tracking"})
MAX_PARAM_VALUE = 500  # MLflow accepts 6000; long values (inline chat templates) are cut
STEP_METRICS = ("loss", "lr", "epoch", "tokensPerSecond", "stepSeconds")
TAG_PREFIX = "kubetune."
BATCH = 100  # parameters (and tags) per log_batch request, MLflow's limit


def params_of(cfg: TrainerConfig) -> dict[str, str]:
    """The run's parameters: the resolved spec sections flattened to dotted wire paths, as strings."""
    wire = cfg.spec.wire()
    training = cfg.spec.training
    if training.method == "lora":  # the effective LoRA settings, also when the spec leaves them to defaults
        wire["training"]["lora"] = training.lora_settings.wire()
    out: dict[str, str] = {}
    for section in PARAM_SECTIONS:
        if section in wire:
            _flatten(section, wire[section], out)
    out["runUri"] = cfg.run_uri
    return out


def _flatten(prefix: str, value: Any, out: dict[str, str]) -> None:
    if isinstance(value, dict):
        for key, item in value.items():
            if key not in UNLOGGED_KEYS:
                _flatten(f"{prefix}.{key}", item, out)
        return
    text = value if isinstance(value, str) else json.dumps(value, sort_keys=True)
    out[prefix] = text if len(text) <= MAX_PARAM_VALUE else text[: MAX_PARAM_VALUE - 3] + "..."


def step_metrics(record: dict[str, Any]) -> dict[str, float]:
    """The figures of one metrics.jsonl step line to log at its step: loss, lr, ... and every eval* figure."""
    keys = [k for k in STEP_METRICS if k in record] + [k for k in record if k.startswith("eval")]
    return {k: float(record[k]) for k in keys if _finite(record[k])}


def evaluation_metrics(summary: EvaluationSummary) -> dict[str, float]:
    """Base versus fine-tuned on the held-out data: base.<metric>, fineTuned.<metric>, improvement.<metric>."""
    figures = {"base": summary.base, "fineTuned": summary.fine_tuned, "improvement": summary.improvement}
    return {f"{name}.{summary.metric}": float(v) for name, v in figures.items() if v is not None and _finite(v)}


def run_tags(cfg: TrainerConfig) -> dict[str, str]:
    job = cfg.job
    tags = {f"{TAG_PREFIX}namespace": job.namespace, f"{TAG_PREFIX}name": job.name, f"{TAG_PREFIX}runUri": cfg.run_uri}
    if job.uid:
        tags[f"{TAG_PREFIX}uid"] = job.uid
    return tags


def _finite(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


class _QuietRetries(logging.Filter):
    """Drops urllib3's own warning for each retried MLflow request: the tracker warns once, and that is all."""

    def filter(self, record: logging.LogRecord) -> bool:
        return "/mlflow/" not in record.getMessage()


_QUIET_RETRIES = _QuietRetries()


def start_tracking(cfg: TrainerConfig) -> Tracker | None:
    """A Tracker for the job's spec.tracking.mlflow, or None when the job has none."""
    if cfg.spec.tracking is None:
        return None
    return Tracker(cfg)


class Tracker:
    """One MLflow run, fed by the training thread and written by a background thread. Close it at the end."""

    def __init__(self, cfg: TrainerConfig):
        assert cfg.spec.tracking is not None
        mlflow = cfg.spec.tracking.mlflow
        for name, value in HTTP_DEFAULTS.items():
            os.environ.setdefault(name, value)
        logging.getLogger("urllib3.connectionpool").addFilter(_QUIET_RETRIES)  # adding it twice adds it once
        self.uri = mlflow.uri
        self.experiment = mlflow.experiment or f"{cfg.job.namespace}/{cfg.job.name}"
        self.run_uri = cfg.run_uri
        self.run_name = cfg.job.name
        self.run_id: str | None = None
        self.experiment_id: str | None = None
        self.off = False  # set when the server cannot be reached: nothing more is sent
        self.warned: set[str] = set()
        self._tags = run_tags(cfg)
        self._params = params_of(cfg)
        self._metrics: list[tuple[str, float, int, int]] = []  # key, value, timestamp (ms), step
        self._parent_of: str | None = None  # a trial's job run URI, to link the trial's run to the job's
        self._last_step = 0
        self._end: str | None = None  # FINISHED or FAILED once close() was called
        self._failed = False
        self._lock = threading.Condition()
        self._thread = threading.Thread(target=self._run, name="kubetune-mlflow", daemon=True)
        self._thread.start()

    # ---------------------------------------------------------------- what the reporter calls

    def record(self, record: dict[str, Any]) -> None:
        """One metrics.jsonl line: a step's figures are logged at its step; a failed attempt marks the run."""
        if record.get("event") == "failed":
            self._failed = True
            return
        if "event" in record or not isinstance(record.get("step"), int):
            return
        self._last_step = record["step"]
        self._add_metrics(step_metrics(record), record["step"])

    def data(self, stats: dict[str, Any]) -> None:
        """What preprocessing saw (status.data), as parameters data.<name>."""
        self._add(params={f"data.{k}": json.dumps(v) for k, v in stats.items() if v is not None})

    def evaluation(self, summary: EvaluationSummary) -> None:
        self._add_metrics(evaluation_metrics(summary), self._last_step)
        tags = {
            f"{TAG_PREFIX}evaluation.metric": summary.metric,
            f"{TAG_PREFIX}evaluation.reportUri": summary.report_uri,
        }
        self._add(tags={k: v for k, v in tags.items() if v})

    def model(self, artifact: ModelArtifact) -> None:
        """Where the exported model is: tags kubetune.model.uri, .kind, .baseUri, .mergedUri."""
        fields = {
            "uri": artifact.uri,
            "kind": artifact.kind,
            "baseUri": artifact.base_uri,
            "mergedUri": artifact.merged_uri,
        }
        self._add(tags={f"{TAG_PREFIX}model.{k}": v for k, v in fields.items() if v})

    def trial(self, trial_id: str) -> None:
        """This run is tuning trial `trial_id` (its run prefix is <job run>/trials/<id>)."""
        suffix = f"/trials/{trial_id}"
        with self._lock:
            self._tags.update({f"{TAG_PREFIX}trial": trial_id, "mlflow.runName": f"{self.run_name}-{trial_id}"})
            if self.run_uri.endswith(suffix):
                self._parent_of = self.run_uri[: -len(suffix)]

    def close(self, timeout: float = 15.0) -> None:
        """End the run (FINISHED, or FAILED after a failed attempt) after sending what is pending; waits at most
        `timeout` seconds."""
        with self._lock:
            self._end = "FAILED" if self._failed else "FINISHED"
            self._lock.notify()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning(
                "MLflow tracking at %s did not finish within %.0fs; the run may lack its end", self.uri, timeout
            )

    # ---------------------------------------------------------------- background thread

    def _add_metrics(self, metrics: dict[str, float], step: int) -> None:
        now = int(time.time() * 1000)
        with self._lock:
            if not self.off:
                self._metrics.extend((k, v, now, step) for k, v in metrics.items())

    def _add(self, params: dict[str, str] | None = None, tags: dict[str, str] | None = None) -> None:
        with self._lock:
            if not self.off:
                self._params.update(params or {})
                self._tags.update(tags or {})

    def _run(self) -> None:
        client = None
        last_flush = time.monotonic()
        while True:
            with self._lock:
                while self._end is None and time.monotonic() - last_flush < FLUSH_SECONDS:
                    self._lock.wait(max(0.05, FLUSH_SECONDS - (time.monotonic() - last_flush)))
                params, tags, metrics = self._params, self._tags, self._metrics
                self._params, self._tags, self._metrics = {}, {}, []
                parent_of, self._parent_of = self._parent_of, None
                end = self._end
            last_flush = time.monotonic()
            if not self.off:
                try:
                    client = client or self._connect()
                    self._send(client, params, tags, metrics, parent_of, end)
                except Exception as exc:  # noqa: BLE001 - tracking must never fail training
                    self._failure(exc, fatal=self.run_id is None)  # no run to log to: nothing more to try
            if end is not None:
                return

    def _connect(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.uri)

    def _send(
        self,
        client: Any,
        params: dict[str, str],
        tags: dict[str, str],
        metrics: list[tuple[str, float, int, int]],
        parent_of: str | None,
        end: str | None,
    ) -> None:
        from mlflow.entities import Metric, Param, RunTag

        if self.run_id is None:
            self.run_id = self._open_run(client, tags)
        if parent_of is not None:
            parent = self._find_run(client, parent_of)
            if parent is not None:
                tags["mlflow.parentRunId"] = parent
        batches: list[dict[str, Any]] = []
        items = [Param(k, v) for k, v in params.items()]
        batches += [{"params": items[i : i + BATCH]} for i in range(0, len(items), BATCH)]
        tag_items = [RunTag(k, v) for k, v in tags.items()]
        batches += [{"tags": tag_items[i : i + BATCH]} for i in range(0, len(tag_items), BATCH)]
        points = [Metric(k, v, ts, step) for k, v, ts, step in metrics]
        batches += [{"metrics": points[i : i + 1000]} for i in range(0, len(points), 1000)]
        for batch in batches:  # one refused batch (a changed parameter) does not drop the others
            try:
                client.log_batch(self.run_id, **batch)
            except Exception as exc:  # noqa: BLE001 - see _failure
                self._failure(exc)
                if self.off:
                    return
        if end is not None:
            client.set_terminated(self.run_id, end)

    def _open_run(self, client: Any, tags: dict[str, str]) -> str:
        """The run of this run prefix: an earlier attempt's (set running again) or a new one."""
        from mlflow.exceptions import MlflowException

        experiment = client.get_experiment_by_name(self.experiment)
        if experiment is None:
            try:
                experiment_id = client.create_experiment(self.experiment)
            except MlflowException:  # made by another trial or attempt in the meantime
                experiment = client.get_experiment_by_name(self.experiment)
                if experiment is None:
                    raise
                experiment_id = experiment.experiment_id
        else:
            experiment_id = experiment.experiment_id
        self.experiment_id = experiment_id
        found = self._find_run(client, self.run_uri)
        if found is not None:
            client.update_run(found, status="RUNNING")
            log.info("MLflow: continuing run %s in experiment %r at %s", found, self.experiment, self.uri)
            return found
        run = client.create_run(experiment_id, run_name=tags.get("mlflow.runName", self.run_name), tags=tags)
        log.info("MLflow: run %s in experiment %r at %s", run.info.run_id, self.experiment, self.uri)
        return str(run.info.run_id)

    def _find_run(self, client: Any, run_uri: str) -> str | None:
        if "'" in run_uri or "\\" in run_uri:  # not expressible in a filter string: no lookup
            return None
        runs = client.search_runs(
            [self.experiment_id], filter_string=f"tags.`{TAG_PREFIX}runUri` = '{run_uri}'", max_results=1
        )
        return str(runs[0].info.run_id) if runs else None

    def _failure(self, exc: BaseException, fatal: bool = False) -> None:
        """A refused request is dropped (one warning per error code); anything else (the server is down, a
        timeout, no client installed), or a failure to open the run, turns tracking off, with one warning."""
        code = getattr(exc, "error_code", None)
        refused = type(exc).__name__ == "RestException" and code is not None and not fatal
        kind = str(code) if refused else "unreachable"
        if kind not in self.warned:
            self.warned.add(kind)
            action = "dropped that update" if refused else "tracking is off for this run"
            # The type and code only: a message can quote a request.
            log.warning("MLflow at %s: %s (%s); %s, training goes on", self.uri, type(exc).__name__, kind, action)
        if not refused:
            with self._lock:
                self.off = True
                self._params, self._tags, self._metrics = {}, {}, []
