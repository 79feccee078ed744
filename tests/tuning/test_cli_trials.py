"""`kubetune status` shows the evaluation and the trials; `kubetune plot --trials` draws every trial's curve."""

from __future__ import annotations

from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

STATUS = {
    "state": "Deployed",
    "progress": {"step": 6, "totalSteps": 6, "percent": 100, "trial": "trial-01"},
    "evaluation": {
        "metric": "evalLoss",
        "base": 10.83,
        "fineTuned": 10.21,
        "improvement": 0.62,
        "reportUri": "s3://b/runs/ns/tuned/eval/report.json",
    },
    "trials": [
        {
            "id": "trial-00",
            "params": {"learningRate": 0.01, "lora.r": 2},
            "objective": 10.3,
            "state": "TERMINATED",
            "step": 6,
        },
        {
            "id": "trial-01",
            "params": {"learningRate": 0.01, "lora.r": 4},
            "objective": 10.21,
            "state": "TERMINATED",
            "step": 6,
        },
        {
            "id": "trial-02",
            "params": {"learningRate": 0.5, "lora.r": 2},
            "objective": 17.5,
            "state": "EARLY_STOPPED",
            "step": 2,
        },
    ],
    "bestTrial": "trial-01",
}


def test_status_shows_evaluation_and_trials() -> None:
    from kubetune_cli.status import render

    text = render({"metadata": {"name": "tuned", "namespace": "ns"}, "status": STATUS})
    assert "eval      evalLoss: base 10.8300 -> fine-tuned 10.2100 (improvement 0.6200)" in text
    assert "report s3://b/runs/ns/tuned/eval/report.json" in text
    assert "trials    3 (1 early stopped, 2 terminated); best trial-01" in text
    lines = text.splitlines()
    best = next(ln for ln in lines if "trial-01" in ln and "TERMINATED" in ln)
    assert "learningRate=0.01 lora.r=4" in best and best.endswith("<- best") and "evalLoss 10.2100" in best
    assert any("trial-02" in ln and "EARLY_STOPPED" in ln and "step 2" in ln for ln in lines)
    assert "trial trial-01" in text  # progress says which trial its figures are from


def test_plot_trials_writes_a_png(tmp_path: Path) -> None:
    from kubetune_cli.plot import plot_trials

    def curve(losses: list[float]) -> list[dict]:
        out = []
        for step, loss in enumerate(losses, 1):
            out.append({"step": step, "loss": loss + 0.1})
            if step % 2 == 0:
                out.append({"step": step, "loss": loss + 0.1, "evalLoss": loss})
        return out

    path = plot_trials(
        {
            "trial-00": curve([10.8, 10.6, 10.5, 10.4]),
            "trial-01": curve([10.8, 10.5, 10.3, 10.2]),
            "trial-02": curve([14.0, 17.5]),
        },
        tmp_path / "trials.png",
        "ns/tuned: 3 trials",
        best="trial-01",
        states={"trial-02": "EARLY_STOPPED"},
        baseline=10.83,
    )
    assert path.stat().st_size > 10_000 and path.read_bytes()[:4] == b"\x89PNG"


def test_trial_curves_take_held_out_points_from_the_tuning_driver() -> None:
    from kubetune_cli.plot import loss_series, trial_curves

    job = [
        {"event": "trialResult", "trial": "trial-00", "step": 2, "evalLoss": 10.8},
        {"event": "trialResult", "trial": "trial-00", "step": 4, "evalLoss": 10.7},
        {"event": "trialResult", "trial": "trial-01", "step": 2, "evalLoss": 14.0},  # killed: no file of its own
        {"step": 4, "loss": 10.6, "trial": "trial-00"},
    ]  # the best trial's curve, copied into the job's file
    own = {
        "trial-00": [{"step": s, "loss": 11 - s / 10} for s in range(1, 5)]
        + [{"step": 4, "loss": 10.6, "evalLoss": 10.7}]
    }
    curves = trial_curves(job, own)
    assert loss_series(curves["trial-00"])[1] == [(2, 10.8), (4, 10.7)]
    assert len(loss_series(curves["trial-00"])[0]) == 4
    assert loss_series(curves["trial-01"]) == ([], [(2, 14.0)])


def test_plot_trials_command(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubetune plot NAME --trials`: the job from the cluster, the curves from the job's and trials' files."""
    import argparse
    import contextlib
    import json

    from kubetune_cli import cluster, plot

    files = {
        "metrics.jsonl": "\n".join(
            json.dumps(m)
            for m in [
                {"event": "trialResult", "trial": "trial-00", "step": 2, "evalLoss": 10.8},
                {"event": "trialResult", "trial": "trial-01", "step": 2, "evalLoss": 10.7},
                {"event": "trialResult", "trial": "trial-01", "step": 4, "evalLoss": 10.6},
            ]
        ),
        "trials/trial-01/metrics.jsonl": "\n".join(json.dumps({"step": s, "loss": 11 - s / 10}) for s in range(1, 5)),
    }

    class Conn:
        def get_job(self, name: str, namespace: str | None) -> dict:
            return {"metadata": {"name": name, "namespace": "ns"}, "status": STATUS}

        def read_run_object(self, job: dict, rel: str) -> str | None:
            return files.get(rel)

    monkeypatch.setattr(cluster, "connect", contextlib.contextmanager(lambda: (yield Conn())))
    out = tmp_path / "t.png"
    args = argparse.Namespace(name="tuned", namespace=None, metrics=None, output=str(out), trials=True)
    assert plot.run(args) == 0
    assert out.read_bytes()[:4] == b"\x89PNG"
