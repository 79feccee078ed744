"""The tuning driver's view of its trials: a Ray Tune callback that keeps status.trials, status.bestTrial,
progress.percent and the job's metrics lines current as Tune reports."""

from __future__ import annotations

import logging
from typing import Any

from ray.tune import Callback

from kubetune.api import TrainerConfig, TrialStatus
from kubetune_trainer import evaluate as evaluation
from kubetune_trainer.tune_space import (
    EARLY_STOPPED,
    ERROR,
    RUNNING,
    TERMINATED,
    clean_params,
    select_best,
    trial_id_of,
    trial_state,
)

log = logging.getLogger("kubetune_trainer")

STATUS_TRIALS_LIMIT = 100  # status.trials is for reading: at most this many entries (the report has them all)


class TrialTracker(Callback):
    """Keeps status.trials, progress.percent and metrics lines current as Tune reports (driver side)."""

    def __init__(self, cfg: TrainerConfig, reporter: Any, steps_per_trial: int, total_trials: int, board: Any = None):
        self.cfg, self.reporter = cfg, reporter
        self.board = (
            board  # kubetune_trainer.tune_verdicts.VerdictBoard: where the trials' workers learn Tune's verdicts
        )
        self.metric = evaluation.objective_metric(cfg.spec)
        self.steps_per_trial, self.total_trials = steps_per_trial, total_trials
        self.trials: dict[str, TrialStatus] = {}
        self.last: dict[str, dict[str, Any]] = {}
        self.errors: dict[str, Any] = {}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) into the experiment folder; the reporter (an
        # API client, a thread) stays behind. Tune calls this very object, not an unpickled copy.
        return {**self.__dict__, "reporter": _NullReporter(), "board": None}

    def _entry(self, trial: Any) -> TrialStatus:
        tid = trial_id_of(trial.trial_id)
        if tid not in self.trials:
            self.trials[tid] = TrialStatus(id=tid, params=clean_params((trial.config or {}).get("params", {})))
        return self.trials[tid]

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self._entry(trial).state = RUNNING
        self.reporter.metric(
            {"event": "trialStarted", "trial": self._entry(trial).id, "params": self._entry(trial).params}
        )
        self._publish()

    def on_trial_result(
        self, iteration: int, trials: list[Any], trial: Any, result: dict[str, Any], **info: Any
    ) -> None:
        t = self._entry(trial)
        value = result.get(self.metric)
        # The final result carries `trainedSteps` instead of `step`, ASHA's time attribute: a trial that
        # trained to the end is not judged again (and killed mid-cleanup) on its final report.
        t.step = int(result.get("step") or result.get("trainedSteps") or 0)
        t.objective = float(value) if isinstance(value, (int, float)) else None
        t.state = RUNNING
        if "step" in result:  # Tune's verdict on it (done: the scheduler stopped the trial), for its workers
            self._post(t.id, t.step, bool(result.get("done")))
        self.last[t.id] = {"step": t.step, "final": result.get("final"), self.metric: value}
        # Every evaluation of every trial, also of trials killed before their own metrics.jsonl was written
        # (kubetune plot --trials draws the held-out curves from these lines).
        figures = {k: result[k] for k in evaluation.METRIC_KEYS if isinstance(result.get(k), (int, float))}
        self.reporter.metric(
            {
                "event": "trialResult",
                "trial": t.id,
                "step": t.step,
                **figures,
                "final": bool(result.get("final")),
                "stop": bool(result.get("done")),
            }
        )
        self._publish()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        t = self._entry(trial)
        t.state = trial_state("TERMINATED", self.last.get(t.id))
        self._post(t.id, t.step or 0, True)
        self.reporter.metric(
            {"event": "trialEnded", "trial": t.id, "state": t.state, "step": t.step, self.metric: t.objective}
        )
        log.info("%s %s at step %s: %s %s", t.id, t.state, t.step, self.metric, t.objective)
        self._publish()

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        t = self._entry(trial)
        t.state = ERROR
        self._post(t.id, t.step or 0, True)
        self.errors[t.id] = _error_text(trial)
        self.reporter.metric(
            {
                "event": "trialEnded",
                "trial": t.id,
                "state": ERROR,
                "step": t.step,
                "error": self.errors[t.id].strip().splitlines()[-1:] or None,
            }
        )
        log.warning("%s failed:\n%s", t.id, self.errors[t.id][-4000:])
        self._publish()

    def seed(self, trials: list[Any]) -> list[str]:
        """Trials an earlier driver finished (Tune's restored experiment, ExperimentAnalysis.trials): listed as
        they ended, since Tune does not run them (nor call back for them) again. Returns their ids."""
        kept = []
        for trial in trials:
            if trial.status != "TERMINATED":
                continue  # Tune runs it again: the callbacks report it
            t, last = self._entry(trial), trial.last_result or {}
            value = last.get(self.metric)
            t.step = int(last.get("step") or last.get("trainedSteps") or 0)
            t.objective = float(value) if isinstance(value, (int, float)) else None
            self.last[t.id] = {"step": t.step, "final": last.get("final"), self.metric: value}
            t.state = trial_state("TERMINATED", self.last[t.id])
            kept.append(t.id)
        if kept:
            self._publish()
        return sorted(kept)

    def _post(self, trial: str, step: int, stop: bool) -> None:
        if self.board is not None:
            self.board.post.remote(trial, step, stop)

    def listing(self) -> list[TrialStatus]:
        return [self.trials[k] for k in sorted(self.trials)]

    def _publish(self) -> None:
        mode = "max" if evaluation.higher_is_better(self.metric) else "min"
        best = select_best(self.listing(), mode)
        self.reporter.trials(self.listing()[:STATUS_TRIALS_LIMIT], best.id if best else None)
        ended = sum(1 for t in self.trials.values() if t.state in (TERMINATED, EARLY_STOPPED, ERROR))
        running = sum(min(t.step or 0, self.steps_per_trial) for t in self.trials.values() if t.state == RUNNING)
        done = ended * self.steps_per_trial + running
        total = max(1, self.total_trials * self.steps_per_trial)
        self.reporter.progress(percent=min(99, int(100 * done / total)))


def _error_text(trial: Any) -> str:
    """What a failed trial raised (Tune keeps it in the trial's error file)."""
    path = getattr(trial, "error_file", None) or getattr(trial, "pickled_error_file", None)
    try:
        if path and not str(path).endswith(".pkl"):
            with open(path) as fh:
                return fh.read()
    except OSError:
        pass
    return str(getattr(trial, "error_msg", "") or "unknown error")


class _NullReporter:
    def __getattr__(self, name: str) -> Any:
        return lambda *args, **kwargs: None
