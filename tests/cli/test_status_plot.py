"""`kubetune status` and `kubetune plot` against real servers: a FineTuneJob in a real kube-apiserver whose
status and metrics.jsonl (in SeaweedFS) were written by the trainer's own reporter, the S3 keys in the Secret
the job names."""

from __future__ import annotations

import base64
import json
from pathlib import Path
from typing import Any

import pytest

from kubetune import api

pytestmark = pytest.mark.integration

BUCKET = "kubetune-test"


@pytest.fixture(scope="module")
def crd(control_plane: Any) -> None:
    from kubetune.crd import crd_manifest

    control_plane.install_crds([crd_manifest()])


def _manifest(name: str, ns: str, endpoint: str) -> dict[str, Any]:
    return {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": ns},
        "spec": {
            "model": {"uri": f"s3://{BUCKET}/models/tiny"},
            "dataset": {
                "train": f"s3://{BUCKET}/data/train.jsonl",
                "validationSplit": 0.1,
                "format": "completion",
                "endpoint": endpoint,
                "credentialsSecret": "s3-keys",
            },
            "training": {"maxSteps": 6, "evalIntervalSteps": 3},
            "resources": {"gpusPerWorker": 0, "cpuPerWorker": "1"},
            "output": {"uri": f"s3://{BUCKET}/runs"},
        },
    }


@pytest.fixture
def reported_job(crd: None, control_plane: Any, k8s_client: Any, s3_server: Any, namespace: str) -> dict[str, Any]:
    """A job with six steps reported by kubetune_trainer.status_reporter.Reporter (status patches + metrics.jsonl)."""
    from kubernetes import client

    from kubetune_trainer.status_reporter import Reporter

    core = client.CoreV1Api(k8s_client)
    core.create_namespaced_secret(
        namespace,
        {
            "metadata": {"name": "s3-keys"},
            "data": {
                "AWS_ACCESS_KEY_ID": base64.b64encode(s3_server.access_key.encode()).decode(),
                "AWS_SECRET_ACCESS_KEY": base64.b64encode(s3_server.secret_key.encode()).decode(),
            },
        },
        _preload_content=False,
    )
    name = "tiny-status"
    body = _manifest(name, namespace, s3_server.endpoint_url)
    custom = client.CustomObjectsApi(k8s_client)
    created = json.loads(
        custom.create_namespaced_custom_object(
            api.GROUP, api.VERSION, namespace, api.PLURAL, body, _preload_content=False
        ).data
    )
    # The operator's part of the status (no operator runs in this test).
    custom.patch_namespaced_custom_object_status(
        api.GROUP,
        api.VERSION,
        namespace,
        api.PLURAL,
        name,
        {
            "status": {
                "state": "Succeeded",
                "conditions": [
                    {
                        "type": "Succeeded",
                        "status": "True",
                        "reason": "JobSucceeded",
                        "message": "the Ray job succeeded",
                        "lastTransitionTime": "2026-01-01T00:00:00Z",
                    }
                ],
            }
        },
        _content_type="application/merge-patch+json",
    )
    cfg = api.resolve_trainer_config(name, namespace, created["metadata"]["uid"], api.parse_spec(body["spec"]))
    cfg.reporting.min_interval_seconds = 0
    reporter = Reporter(cfg, s3_server.client(), kubeconfig=str(control_plane.kubeconfig))
    reporter.data(
        {
            "records": 200,
            "trainRecords": 180,
            "validationRecords": 20,
            "duplicatesRemoved": 3,
            "invalidRecords": 0,
            "tokens": 5400,
            "sequences": 90,
        }
    )
    losses = [4.2, 3.9, 3.7, 3.5, 3.45, 3.4]
    for step, loss in enumerate(losses, 1):
        record: dict[str, Any] = {"step": step, "loss": loss, "tokensPerSecond": 250.0, "epoch": step / 6}
        if step % 3 == 0:
            record["evalLoss"] = loss + 0.2
        reporter.metric(record)
        reporter.progress(
            step=step,
            total_steps=6,
            loss=loss,
            eval_loss=record.get("evalLoss"),
            tokens_per_second=250.0,
            eta_seconds=(6 - step) * 2,
            percent=int(100 * step / 6),
        )
    reporter.model(api.ModelArtifact(uri=f"{cfg.run_uri}/model", kind="adapter", base_uri=body["spec"]["model"]["uri"]))
    reporter.close()
    # A Service the dev runtime annotated with the local address of the model server.
    core.create_namespaced_service(
        namespace,
        {
            "metadata": {
                "name": f"{name}-inference",
                "labels": {"kubetune.io/job": name},
                "annotations": {"kubetune.io/local-url": "http://127.0.0.1:41234"},
            },
            "spec": {"selector": {"kubetune.io/job": name}, "ports": [{"port": 8000}]},
        },
        _preload_content=False,
    )
    return {"name": name, "namespace": namespace, "run_uri": cfg.run_uri}


def _cli(monkeypatch: pytest.MonkeyPatch, kubeconfig: Path, *args: str) -> int:
    from kubetune_cli.main import main

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    return main(list(args))


def test_status_shows_progress_data_model_conditions_and_local_url(
    reported_job: dict[str, Any], kubeconfig: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _cli(monkeypatch, kubeconfig, "status", reported_job["name"], "-n", reported_job["namespace"])
    out = capsys.readouterr().out
    assert rc == 0, out
    assert f"{reported_job['namespace']}/{reported_job['name']}: Succeeded" in out
    assert "step 6/6 (100%)" in out and "loss 3.4000" in out and "eval 3.6000" in out and "250 tok/s" in out
    assert "200 records" in out and "3 duplicates" in out
    assert f"{reported_job['run_uri']}/model (adapter)" in out
    assert "Succeeded  True" in out and "JobSucceeded" in out
    assert "http://127.0.0.1:41234" in out

    rc = _cli(monkeypatch, kubeconfig, "status", reported_job["name"], "-n", reported_job["namespace"], "-o", "json")
    status = json.loads(capsys.readouterr().out)
    assert status["progress"]["step"] == 6 and status["data"]["records"] == 200


def test_status_of_a_missing_job(
    crd: None, kubeconfig: Path, namespace: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    rc = _cli(monkeypatch, kubeconfig, "status", "nope", "-n", namespace)
    assert rc == 2
    assert f"no FineTuneJob {namespace}/nope" in capsys.readouterr().err


def test_plot_reads_metrics_from_s3_with_the_jobs_secret(
    reported_job: dict[str, Any],
    kubeconfig: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the keys must come from the job's Secret
        monkeypatch.delenv(var, raising=False)
    png = tmp_path / "loss.png"
    rc = _cli(monkeypatch, kubeconfig, "plot", reported_job["name"], "-n", reported_job["namespace"], "-o", str(png))
    assert rc == 0, capsys.readouterr()
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 10_000

    from kubetune_cli.plot import loss_series, parse_metrics

    bucket, key = f"{reported_job['run_uri']}/metrics.jsonl"[len("s3://") :].split("/", 1)

    text = tmp_path / "m.jsonl"
    train, evals = loss_series(parse_metrics(_read(reported_job, kubeconfig)))
    assert [s for s, _ in train] == [1, 2, 3, 4, 5, 6] and [s for s, _ in evals] == [3, 6]
    del text, bucket, key


def _read(job: dict[str, Any], kubeconfig: Path) -> str:
    from kubetune_cli.cluster import Connection

    conn = Connection(kubeconfig)
    try:
        text = conn.read_run_object(conn.get_job(job["name"], job["namespace"]), "metrics.jsonl")
    finally:
        conn.close()
    assert text is not None
    return text


def test_plot_from_a_local_metrics_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune_cli.main import main

    lines = (
        [{"event": "start", "step": 0}]
        + [{"step": s, "loss": 5.0 - s / 10} for s in range(1, 11)]
        + [{"step": 10, "evalLoss": 4.2, "loss": 4.0}]
    )
    metrics = tmp_path / "metrics.jsonl"
    metrics.write_text("\n".join(json.dumps(x) for x in lines) + "\nnot json\n")
    rc = main(["plot", "--metrics", str(metrics), "-o", str(tmp_path / "p.png")])
    assert rc == 0 and (tmp_path / "p.png").stat().st_size > 10_000


def test_driver_log_outlives_the_ray_cluster(
    reported_job: dict[str, Any],
    kubeconfig: Path,
    s3_server: Any,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The RayJob's entrypoint wrapper (kubetune.runlog) keeps each attempt's driver log in S3; with no RayJob or
    RayCluster left (none exists here), `kubetune logs` and `kubetune status` read it from there."""
    import os
    import subprocess
    import sys

    from kubetune import runlog
    from kubetune_cli.cluster import Connection

    conn = Connection(kubeconfig)
    try:
        job = conn.get_job(reported_job["name"], reported_job["namespace"])
    finally:
        conn.close()
    cfg = api.resolve_trainer_config(
        job["metadata"]["name"], job["metadata"]["namespace"], job["metadata"]["uid"], api.parse_spec(job["spec"])
    )
    config = tmp_path / "config.json"
    config.write_text(json.dumps(cfg.wire()))
    env = {**os.environ, **s3_server.env()}  # the head pod's S3 keys (from the job's Secret)
    attempts = [
        ("print('loading data'); import sys; print('boom', file=sys.stderr); sys.exit(7)", 7),
        ("print('step 6/6 loss 3.4'); print('kubetune-trainer: succeeded')", 0),
    ]
    for code, want in attempts:  # a failed attempt, then its retry: each keeps a folder of its own
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune.runlog", "--config", str(config), "--", sys.executable, "-c", code],
            env=env,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert proc.returncode == want, proc.stderr
        assert proc.stdout.splitlines()[0] in ("loading data", "step 6/6 loss 3.4")  # passed through
        assert f"driver log kept at {cfg.run_uri}/{runlog.HISTORY}/" in proc.stderr
    keys = [k["rel"] for k in s3_server_keys(s3_server, f"{cfg.run_uri}/{runlog.HISTORY}")]
    assert len([k for k in keys if k.endswith("/driver.log")]) == 2 and len(keys) == 4
    assert s3_server.secret_key not in json.dumps(keys)

    for var in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"):  # the CLI takes the keys from the job's Secret
        monkeypatch.delenv(var, raising=False)
    rc = _cli(
        monkeypatch,
        kubeconfig,
        "logs",
        reported_job["name"],
        "-n",
        reported_job["namespace"],
        "--dir",
        str(tmp_path / "no-dev-cluster"),
    )
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert out == "step 6/6 loss 3.4\nkubetune-trainer: succeeded\n"  # the latest attempt
    assert "driver exit code 0" in err
    rc = _cli(monkeypatch, kubeconfig, "status", reported_job["name"], "-n", reported_job["namespace"])
    out = capsys.readouterr().out
    assert rc == 0 and f"history   {cfg.run_uri}/{runlog.HISTORY}/" in out and "driver exit code 0" in out


def s3_server_keys(s3_server: Any, prefix: str) -> list[dict[str, Any]]:
    from kubetune import s3

    return s3.list_keys(s3_server.client(), prefix)
