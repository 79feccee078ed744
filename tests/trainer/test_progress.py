"""The progress reporter against a real kube-apiserver and real S3, as the trainer's ServiceAccount."""

from __future__ import annotations

import json
import time

import pytest
from helpers_k8s import create_job, get_job, install_finetunejob_crd, trainer_kubeconfig, wait_for_status
from trainer_helpers import BUCKET

from kubetune.api import CheckpointRef, ModelArtifact, TrainerConfig

pytestmark = [pytest.mark.training, pytest.mark.integration]


def _config(namespace: str, name: str, uid: str | None, interval: float) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": name, "namespace": namespace, "uid": uid},
            "spec": {
                "model": {"uri": f"s3://{BUCKET}/models/x"},
                "dataset": {"train": f"s3://{BUCKET}/data/x.jsonl", "format": "completion"},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "deploy": {"enabled": False},
            },
            "runUri": f"s3://{BUCKET}/runs/{namespace}/{name}",
            "reporting": {"kubernetes": True, "minIntervalSeconds": interval},
        }
    )


@pytest.mark.timeout(180)
def test_progress_patches_land_in_the_status(control_plane, k8s_client, namespace, s3_server, monkeypatch) -> None:
    from kubetune_trainer.status_reporter import Reporter

    install_finetunejob_crd(control_plane)
    job = create_job(k8s_client, namespace, "reported", f"s3://{BUCKET}/models/x")
    monkeypatch.setenv("KUBECONFIG", str(trainer_kubeconfig(control_plane, k8s_client, job)))
    cfg = _config(namespace, "reported", job["metadata"]["uid"], interval=1.0)
    s3 = s3_server.client()

    t0 = time.monotonic()
    reporter = Reporter(cfg, s3)
    reporter.data(
        {
            "records": 100,
            "trainRecords": 90,
            "duplicatesRemoved": 3,
            "invalidRecords": 2,
            "invalidByReason": {"bad_json": 2},
            "tokens": 5000,
            "sequences": 80,
        }
    )
    for step in range(1, 31):  # 30 steps in ~1.5 s: rate-limited to about one patch a second
        reporter.progress(
            step=step,
            total_steps=100,
            epoch=step / 50,
            loss=5.0 - step * 0.01,
            tokens_per_second=1234.5,
            eta_seconds=100 - step,
            percent=step,
        )
        reporter.metric({"step": step, "loss": 5.0 - step * 0.01})
        time.sleep(0.05)
    status = wait_for_status(k8s_client, namespace, "reported", lambda s: (s.get("progress") or {}).get("step"))
    assert status["data"]["records"] == 100 and status["data"]["invalidByReason"] == {"bad_json": 2}
    reporter.checkpoints([CheckpointRef(step=30, uri=f"{cfg.checkpoints_uri}/step-00000030", eval_loss=4.2)])
    reporter.startup(
        {
            "rayStartSeconds": 2.5,
            "dataSeconds": 4.0,
            "modelLoadSeconds": 7.25,
            "deepspeedInitSeconds": 1.5,
            "firstStepSeconds": 0.5,
            "timeToFirstStepSeconds": 20.0,
        }
    )
    reporter.model(ModelArtifact(uri=cfg.model_uri, kind="adapter", base_uri=cfg.spec.model.uri))
    reporter.progress(step=31, total_steps=100, eval_loss=float("nan"))  # NaN cannot travel in JSON: null
    reporter.close()
    elapsed = time.monotonic() - t0

    status = get_job(k8s_client, namespace, "reported")["status"]
    progress = status["progress"]
    assert progress["step"] == 31 and progress["totalSteps"] == 100 and progress["loss"] == pytest.approx(4.7)
    assert progress["tokensPerSecond"] == 1234.5 and progress["updatedAt"].endswith("Z")
    assert "evalLoss" not in progress
    assert status["checkpoints"] == [{"step": 30, "uri": f"{cfg.checkpoints_uri}/step-00000030", "evalLoss": 4.2}]
    assert status["model"]["uri"] == cfg.model_uri and status["model"]["kind"] == "adapter"
    assert status["startup"] == {
        "rayStartSeconds": 2.5,
        "dataSeconds": 4.0,
        "modelLoadSeconds": 7.25,
        "deepspeedInitSeconds": 1.5,
        "firstStepSeconds": 0.5,
        "timeToFirstStepSeconds": 20.0,
    }
    # Rate limit: 30+ progress updates in a few seconds became a handful of patches.
    assert 2 <= reporter.patches_sent <= elapsed / cfg.reporting.min_interval_seconds + 4, reporter.patches_sent

    body = s3.get_object(Bucket=BUCKET, Key=f"runs/{namespace}/reported/metrics.jsonl")["Body"].read().decode()
    lines = [json.loads(x) for x in body.splitlines()]
    assert [x["step"] for x in lines] == list(range(1, 31)) and all("time" in x for x in lines)

    # Resuming at step 10 keeps the history up to 10 and marks the resume.
    again = Reporter(cfg, s3, resumed_step=10)
    again.metric({"step": 11, "loss": 1.0})
    again.close()
    body = s3.get_object(Bucket=BUCKET, Key=f"runs/{namespace}/reported/metrics.jsonl")["Body"].read().decode()
    lines = [json.loads(x) for x in body.splitlines()]
    assert [x.get("step") for x in lines] == list(range(1, 11)) + [10, 11]
    assert lines[10]["event"] == "resumed"


@pytest.mark.timeout(120)
def test_a_refused_patch_never_fails_training(
    control_plane, k8s_client, namespace, s3_server, monkeypatch, caplog
) -> None:
    """The trainer's Role reaches its own job only; patching another one is refused, logged, and survived."""
    from kubetune_trainer.status_reporter import Reporter

    install_finetunejob_crd(control_plane)
    own = create_job(k8s_client, namespace, "own", f"s3://{BUCKET}/models/x")
    create_job(k8s_client, namespace, "other", f"s3://{BUCKET}/models/x")
    monkeypatch.setenv("KUBECONFIG", str(trainer_kubeconfig(control_plane, k8s_client, own)))

    reporter = Reporter(_config(namespace, "other", None, interval=0), s3_server.client())
    reporter.progress(step=1, total_steps=2, loss=1.0)
    reporter.close(timeout=20)
    assert reporter.patches_sent == 0
    assert any("status patch" in r.getMessage() and "403" in r.getMessage() for r in caplog.records)
    assert "progress" not in (get_job(k8s_client, namespace, "other").get("status") or {})

    # A uid that is not the job's (the job was deleted and re-created under the same name) is refused too.
    reporter = Reporter(
        _config(namespace, "own", "00000000-0000-0000-0000-000000000000", interval=0), s3_server.client()
    )
    reporter.progress(step=1, total_steps=2)
    reporter.close(timeout=20)
    assert reporter.patches_sent == 0
    assert "progress" not in (get_job(k8s_client, namespace, "own").get("status") or {})


@pytest.mark.unit
def test_kubetune_run_prints_the_time_to_first_step_by_phase(tmp_path) -> None:
    """The view prints status.startup once, in the order of the phases, with the caller's own phase first."""
    from rich.console import Console

    from kubetune_cli.progress_view import TrainingView, startup_line

    startup = {
        "dataSeconds": 14.0,
        "rayStartSeconds": 1.2,
        "modelLoadSeconds": 9.5,
        "firstStepSeconds": 3.0,
        "timeToFirstStepSeconds": 50.0,
    }
    line = startup_line(startup, {"Ray cluster start": 20.0})
    assert line == (
        "time to first step 1m10s: Ray cluster start 20.0s, Ray start 1.2s, data 14.0s, "
        "model load 9.5s, first step 3.0s"
    )
    console = Console(file=open(tmp_path / "out.txt", "w"), force_terminal=False, width=200)  # noqa: SIM115 - closed below
    view = TrainingView(console, "job", before_trainer={"Ray cluster start": 20.0})
    view.update([{"status": {"startup": startup}}, {"status": {"progress": {"step": 1, "totalSteps": 2}}}])
    view.update([{"status": {"startup": startup}}])
    view.stop()
    console.file.close()
    assert (tmp_path / "out.txt").read_text().count(line) == 1
