"""Live training progress in the terminal, from the trainer's reports.

The input is what the trainer's rank 0 reports (kubetune_trainer.status_reporter): status updates ({"status":
{"progress": {...}}}, {"status": {"data": {...}}}, ...) and metrics lines ({"metric": {...}}). `kubetune run`
reads them from the local progress file as they are written.

On a terminal this is a rich progress bar (step, loss, evaluation loss, tokens/s, ETA); elsewhere (CI logs,
pipes) a plain line per reported step, at most one every few seconds, so logs stay readable.
"""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, SpinnerColumn, TextColumn, TimeElapsedColumn

PLAIN_INTERVAL_S = 5.0
# status.startup's phases in the order they happen, with the words `kubetune run` prints for them.
STARTUP_PHASES = (
    ("rayStartSeconds", "Ray start"),
    ("dataSeconds", "data"),
    ("workerStartSeconds", "workers"),
    ("modelLoadSeconds", "model load"),
    ("deepspeedInitSeconds", "DeepSpeed init"),
    ("resumeSeconds", "resume"),
    ("baseEvalSeconds", "base evaluation"),
    ("firstStepSeconds", "first step"),
)


def fmt_seconds(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    seconds = int(seconds)
    if seconds >= 3600:
        return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
    if seconds >= 60:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds}s"


def fmt_num(value: float | None, digits: int = 4) -> str:
    return "-" if value is None else f"{value:.{digits}f}"


def startup_line(startup: dict[str, Any], before: dict[str, float] | None = None) -> str:
    """'time to first step 1m52s: Ray start 21s, data 14s, ...' from status.startup; `before` adds phases of
    the caller's own before the trainer started (e.g. kubetune run's local Ray cluster)."""
    parts = [(name, float(seconds)) for name, seconds in (before or {}).items()]
    parts += [(name, float(startup[key])) for key, name in STARTUP_PHASES if isinstance(startup.get(key), (int, float))]
    total = startup.get("timeToFirstStepSeconds")
    head = (
        "time to first step"
        if total is None
        else f"time to first step {fmt_seconds(float(total) + sum((before or {}).values()))}"
    )
    return head + ": " + ", ".join(f"{name} {seconds:.1f}s" for name, seconds in parts)


class FileFollower:
    """New JSON lines of a file that another process appends to (a partial last line waits for its end)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._offset = 0
        self._partial = b""

    def read(self) -> list[dict[str, Any]]:
        try:
            with open(self.path, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except OSError:
            return []
        self._offset += len(data)
        data = self._partial + data
        *lines, self._partial = data.split(b"\n")
        out = []
        for line in lines:
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out


class TrainingView:
    """Renders progress; feed it report objects with `update`, close it with `stop`."""

    def __init__(self, console: Console, job: str, before_trainer: dict[str, float] | None = None) -> None:
        self.console = console
        self.job = job
        self.before_trainer = before_trainer or {}  # phases before the trainer ran, for the time to first step
        self._printed_startup = False
        self.status: dict[str, Any] = {}
        self.metrics: list[dict[str, Any]] = []
        self._progress: Progress | None = None
        self._task: Any = None
        self._last_plain = 0.0
        self._last_plain_step: int | None = None
        self._printed_data = False
        if console.is_terminal:
            self._progress = Progress(
                SpinnerColumn(),
                TextColumn("[bold]{task.description}"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("loss {task.fields[loss]}"),
                TextColumn("eval {task.fields[eval]}"),
                TextColumn("{task.fields[tps]} tok/s"),
                TextColumn("ETA {task.fields[eta]}"),
                TimeElapsedColumn(),
                console=console,
                transient=False,
            )
            self._task = self._progress.add_task("setting up", total=None, loss="-", eval="-", tps="-", eta="-")
            self._progress.start()
        else:
            console.print(f"{job}: setting up (Ray, data preparation, model)")

    def update(self, reports: list[dict[str, Any]]) -> None:
        for r in reports:
            if "metric" in r:
                self.metrics.append(r["metric"])
            for key, value in (r.get("status") or {}).items():
                if key == "progress" and isinstance(value, dict):
                    self.status.setdefault("progress", {}).update(value)
                else:
                    self.status[key] = value
        if reports:
            self._render()

    def _render(self) -> None:
        p = self.status.get("progress") or {}
        data = self.status.get("data")
        if data and not self._printed_data:
            self._printed_data = True
            self.console.print(
                f"data: {data.get('records', '?')} records, {data.get('trainRecords', '?')} for training, "
                f"{data.get('validationRecords', '?')} held out, {data.get('duplicatesRemoved', 0)} duplicates "
                f"and {data.get('invalidRecords', 0)} invalid dropped; {data.get('sequences', '?')} sequences, "
                f"{data.get('tokens', '?')} tokens"
            )
        startup = self.status.get("startup")
        if startup and not self._printed_startup:
            self._printed_startup = True
            self.console.print(startup_line(startup, self.before_trainer))
        step, total = p.get("step"), p.get("totalSteps")
        fields: dict[str, Any] = {  # rich's Progress.update takes extra fields as **Any
            "loss": fmt_num(p.get("loss")),
            "eval": fmt_num(p.get("evalLoss")),
            "tps": "-" if p.get("tokensPerSecond") is None else f"{p['tokensPerSecond']:.0f}",
            "eta": fmt_seconds(p.get("etaSeconds")),
        }
        if self._progress is not None:
            self._progress.update(
                self._task,
                description="training" if step is not None else "setting up",
                completed=step or 0,
                total=total,
                **fields,
            )
            return
        now = time.monotonic()
        if (
            step is not None
            and step != self._last_plain_step
            and (now - self._last_plain >= PLAIN_INTERVAL_S or step == total)
        ):
            self._last_plain, self._last_plain_step = now, step
            self.console.print(
                f"{self.job}: step {step}/{total} loss {fields['loss']} eval {fields['eval']} "
                f"{fields['tps']} tok/s ETA {fields['eta']}"
            )

    def stop(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
