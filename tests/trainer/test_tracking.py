"""MLflow tracking (kubetune_trainer.tracking): what a run logs, and that a tracking server that is down or refuses
a request never fails training.

The unit tests need no server (the failure path uses a closed loopback port). The integration test runs the
Tracker against a real MLflow server (the `mlflow_server` fixture) without training: a resumed attempt continues
its run, a trial's run is the job run's child, a changed parameter is refused and dropped with one warning. The
end-to-end check (a real training logs params, step metrics, evaluation and model URI) is folded into
tests/trainer/test_training.py::test_instruction_lora_zero3, and a closed port there into
test_classification_full_zero2.
"""

from __future__ import annotations

import logging

import pytest

from kubetune.api import EvaluationSummary, ModelArtifact, TrainerConfig
from kubetune_trainer import tracking
from tests.support.waiting import free_port


def _config(name: str = "job", tracking_uri: str = "http://127.0.0.1:1", **spec_extra: object) -> TrainerConfig:
    spec = {
        "model": {"uri": "hf://org/base", "revision": "main", "tokenSecretRef": {"name": "hf-token"}},
        "dataset": {
            "train": "s3://bucket/data/train.jsonl",
            "format": "chat",
            "validationSplit": 0.1,
            "credentialsSecret": "s3-keys",
            "chatTemplate": "{% for m in messages %}" + "x" * 600 + "{% endfor %}",
        },
        "training": {"method": "lora", "lora": {"r": 8, "targetModules": ["q_proj", "v_proj"]}, "maxSteps": 5},
        "output": {"uri": "s3://bucket/runs"},
        "tracking": {"mlflow": {"uri": tracking_uri}},
        **spec_extra,
    }
    return TrainerConfig.model_validate(
        {
            "job": {"name": name, "namespace": "team-a", "uid": "u-1"},
            "spec": spec,
            "runUri": f"s3://bucket/runs/team-a/{name}/u-1",
        }
    )


@pytest.mark.unit
def test_params_are_the_resolved_settings_without_secret_names() -> None:
    params = tracking.params_of(_config())
    assert params["training.lora.r"] == "8"
    assert params["training.lora.targetModules"] == '["q_proj", "v_proj"]'
    assert params["training.learningRate"] == "0.0002"  # a default, resolved
    assert params["training.deepspeed.zeroStage"] == "2"
    assert params["dataset.format"] == "chat"
    assert params["dataset.preprocessing.maxSeqLength"] == "1024"
    assert params["model.uri"] == "hf://org/base" and params["model.revision"] == "main"
    assert params["runUri"] == "s3://bucket/runs/team-a/job/u-1"
    assert len(params["dataset.chatTemplate"]) == tracking.MAX_PARAM_VALUE
    assert not [k for k in params if "credentialsSecret" in k or "tokenSecretRef" in k or "tracking" in k]
    assert "s3-keys" not in params.values() and "hf-token" not in str(params)
    assert not [k for k in params if k.startswith("deploy.")]
    defaults = _config(training={"method": "lora", "maxSteps": 5})  # no lora block: its defaults are logged
    assert tracking.params_of(defaults)["training.lora.alpha"] == "32"


@pytest.mark.unit
def test_step_and_evaluation_metrics() -> None:
    record = {
        "step": 3,
        "epoch": 0.5,
        "loss": 2.5,
        "lr": 1e-4,
        "tokens": 900,
        "tokensPerSecond": 120.5,
        "stepSeconds": 0.2,
        "evalLoss": 2.75,
        "evalPerplexity": float("nan"),
    }
    assert tracking.step_metrics(record) == {
        "loss": 2.5,
        "lr": 1e-4,
        "epoch": 0.5,
        "tokensPerSecond": 120.5,
        "stepSeconds": 0.2,
        "evalLoss": 2.75,
    }
    summary = EvaluationSummary(metric="evalLoss", base=3.0, fine_tuned=2.5, improvement=0.5, report_uri="s3://b/r")
    assert tracking.evaluation_metrics(summary) == {
        "base.evalLoss": 3.0,
        "fineTuned.evalLoss": 2.5,
        "improvement.evalLoss": 0.5,
    }
    assert tracking.evaluation_metrics(EvaluationSummary(metric="accuracy", base=None, fine_tuned=0.9)) == {
        "fineTuned.accuracy": 0.9
    }
    assert tracking.run_tags(_config()) == {
        "kubetune.namespace": "team-a",
        "kubetune.name": "job",
        "kubetune.uid": "u-1",
        "kubetune.runUri": "s3://bucket/runs/team-a/job/u-1",
    }


@pytest.mark.unit
def test_no_tracking_spec_means_no_tracker() -> None:
    cfg = _config()
    assert (
        tracking.start_tracking(cfg.model_copy(update={"spec": cfg.spec.model_copy(update={"tracking": None})})) is None
    )


@pytest.mark.unit
def test_a_server_that_is_down_turns_tracking_off_with_one_warning(caplog: pytest.LogCaptureFixture) -> None:
    """Nothing listens on the port: every call returns at once, close() ends, one warning, nothing raised."""
    url = f"http://127.0.0.1:{free_port()}"
    caplog.set_level(logging.WARNING, logger=tracking.__name__)
    tracker = tracking.Tracker(_config(tracking_uri=url))
    for step in range(1, 6):
        tracker.record({"step": step, "loss": 3.0 - step / 10, "lr": 1e-4})
    tracker.data({"records": 10})
    tracker.evaluation(EvaluationSummary(metric="evalLoss", base=3.0, fine_tuned=2.0))
    tracker.model(ModelArtifact(uri="s3://bucket/runs/team-a/job/u-1/model", kind="adapter"))
    tracker.close(timeout=300)  # generous: importing the client alone can take a minute on a loaded machine
    assert tracker.off and tracker.run_id is None
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert warnings[0].startswith(f"MLflow at {url}: ") and "training goes on" in warnings[0]
    tracker.record({"step": 6, "loss": 1.0})  # after the end: ignored, no error


@pytest.mark.integration
@pytest.mark.timeout(600)
def test_resume_trials_and_refused_updates_against_a_real_server(
    mlflow_server: object, caplog: pytest.LogCaptureFixture
) -> None:
    server = mlflow_server
    client = server.client()  # type: ignore[attr-defined]
    cfg = _config("resumable", tracking_uri=server.url)  # type: ignore[attr-defined]
    caplog.set_level(logging.WARNING, logger=tracking.__name__)

    first = tracking.Tracker(cfg)
    first.record({"step": 1, "loss": 3.0})
    first.record({"step": 2, "loss": 2.0})
    first.record({"event": "failed", "step": 2, "error": "RuntimeError: injected"})
    first.close(timeout=300)
    assert first.run_id and not first.off
    assert client.get_run(first.run_id).info.status == "FAILED"

    # The restarted attempt continues the same run; a parameter that changed is refused by the server and
    # dropped with one warning, the rest (metrics, tags) still lands.
    changed = cfg.model_copy(deep=True)
    assert changed.spec.training.lora is not None
    changed.spec.training.lora.r = 16
    second = tracking.Tracker(changed)
    second.record({"step": 3, "loss": 1.5})
    second.model(ModelArtifact(uri=f"{cfg.run_uri}/model", kind="adapter"))
    second.close(timeout=300)
    assert second.run_id == first.run_id and not second.off
    run = client.get_run(first.run_id)
    assert run.info.status == "FINISHED"
    assert run.data.params["training.lora.r"] == "8"
    assert run.data.tags["kubetune.model.uri"] == f"{cfg.run_uri}/model"
    assert [(m.step, m.value) for m in client.get_metric_history(first.run_id, "loss")] == [
        (1, 3.0),
        (2, 2.0),
        (3, 1.5),
    ]
    refused = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(refused) == 1 and "INVALID_PARAMETER_VALUE" in refused[0], refused

    # A tuning trial (run prefix <job run>/trials/<id>) is a child of the job's run, named after the trial.
    trial_cfg = cfg.model_copy(update={"run_uri": f"{cfg.run_uri}/trials/t0001"})
    trial = tracking.Tracker(trial_cfg)
    trial.trial("t0001")
    trial.record({"step": 1, "loss": 2.5})
    trial.close(timeout=300)
    child = client.get_run(trial.run_id)
    assert child.data.tags["mlflow.parentRunId"] == first.run_id
    assert child.data.tags["kubetune.trial"] == "t0001"
    assert child.info.run_name == "resumable-t0001"
    assert child.info.experiment_id == run.info.experiment_id
    assert client.get_experiment(run.info.experiment_id).name == "team-a/resumable"
