"""The trainer end to end: S3 data -> prepare -> Ray Train + DeepSpeed (2 workers) -> checkpoints -> export.

The matrix is covered in four trainings (plus one for resuming), each combination appearing at least once; the
chat row is the 4-rank layout run (tests/trainer/test_layout_training.py), which is the same shape:

    format          file     method  ZeRO  also checks
    completion      jsonl    LoRA    2     exact resume, retention, merged export, status in the apiserver
    chat            parquet  full    3     ZeRO-3 gathered full export generates, loss goes down (4 ranks)
    instruction     jsonl    LoRA    3     ZeRO-3 gathered adapter (non-zero B matrices) generates, offload,
                                           MLflow tracking (params, step metrics, evaluation, model URI)
    classification  jsonl    full    2     accuracy evaluated, classifier exported, `--local` (own Ray),
                                           an MLflow server that is down changes nothing
"""

from __future__ import annotations

import json
import math
import random
from collections import defaultdict
from pathlib import Path
from typing import Any

import pytest
from helpers_k8s import create_job, install_finetunejob_crd, trainer_kubeconfig, wait_for_status
from trainer_helpers import BUCKET, TrainerEnv, assert_generates, fortunes, put_jsonl

from tests.support.waiting import free_port

pytestmark = [pytest.mark.training]


def _steps(metrics: list[dict]) -> dict[int, dict]:
    return {m["step"]: m for m in metrics if "loss" in m and "event" not in m}


def _trace(folder: Path) -> dict[int, list[dict]]:
    """rank -> the micro-batches it trained on, in order."""
    out: dict[int, list[dict]] = {}
    for path in sorted(folder.glob("rank-*.jsonl")):
        out[int(path.stem.split("-")[1])] = [json.loads(line) for line in path.read_text().splitlines()]
    return out


# ------------------------------------------------------------------------------------------- completion


@pytest.mark.timeout(1200)
def test_completion_lora_zero2_resumes_exactly(
    trainer_env: TrainerEnv, control_plane, k8s_client, namespace, tmp_path: Path
) -> None:
    """Exact resume, in two trainings instead of three: the uninterrupted run's checkpoint at step 6 is
    exactly what a run stopped after step 6 leaves behind, so a second job that finds (a copy of) it must
    train steps 7 and 8 to the same losses on the same rows. That second run is also made to fail right
    after its last checkpoint, to check how a failed run ends (exit code, last line, history kept)."""
    env = trainer_env
    data = put_jsonl(
        env.client,
        f"s3://{BUCKET}/data/completion/fortunes.jsonl",
        [{"text": t} for t in fortunes("computers", limit=60)],
    )
    spec = {
        "model": {"uri": env.model_uri},
        "dataset": {
            "train": data,
            "format": "completion",
            "validationSplit": 0.1,
            "preprocessing": {"maxSeqLength": 32},
        },
        "training": {
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "dropout": 0.1},  # dropout: resume must restore RNG
            "maxSteps": 8,
            "perDeviceBatchSize": 2,
            "gradientAccumulationSteps": 2,
            "learningRate": 3e-3,
            "warmupRatio": 0.2,
            "evalIntervalSteps": 4,
            "checkpoint": {"intervalSteps": 3, "keep": 2},
            "deepspeed": {"zeroStage": 2},
        },
        "output": {"uri": f"s3://{BUCKET}/runs", "exportMerged": True},
    }

    # The uninterrupted run reports to a real kube-apiserver, as its trainer ServiceAccount would in a pod.
    install_finetunejob_crd(control_plane)
    job = create_job(k8s_client, namespace, "straight", env.model_uri)
    kubeconfig = trainer_kubeconfig(control_plane, k8s_client, job)
    straight_cfg = env.config(
        "straight",
        spec,
        reporting={"kubernetes": True, "minIntervalSeconds": 0},
        job={"name": "straight", "namespace": namespace, "uid": job["metadata"]["uid"]},
    )
    straight = env.run(
        straight_cfg,
        env={"KUBETUNE_TRACE_DIR": str(_mkdir(tmp_path / "trace-straight")), "KUBECONFIG": str(kubeconfig)},
    )
    assert straight.returncode == 0, straight.output[-6000:]
    assert straight.final_line.startswith("kubetune-trainer: succeeded: step 8/8"), straight.final_line
    straight_uri = straight_cfg["runUri"]
    assert {k.split("/")[0] for k in env.keys(f"{straight_uri}/checkpoints")} == {"step-00000006", "step-00000008"}

    # A second job that stopped after step 6: its checkpoint folder holds step 6 (a copy of the first run's)
    # and a half-written step 7 (the process died while writing it), which must be ignored.
    # maxWorkerRestarts 0: the injected failure must end this run (with restarts Ray Train would recover it).
    resumed_cfg = env.config("resumed", {**spec, "training": {**spec["training"], "maxWorkerRestarts": 0}})
    resumed_uri = resumed_cfg["runUri"]
    step6 = "checkpoints/step-00000006"
    for rel in env.keys(f"{straight_uri}/{step6}"):
        env.client.copy_object(
            Bucket=BUCKET,
            Key=f"{_key(resumed_uri)}/{step6}/{rel}",
            CopySource={"Bucket": BUCKET, "Key": f"{_key(straight_uri)}/{step6}/{rel}"},
        )
    env.client.put_object(Bucket=BUCKET, Key=f"{_key(resumed_uri)}/checkpoints/step-00000007/ds/x.pt", Body=b"partial")

    resumed = env.run(
        resumed_cfg,
        env={"KUBETUNE_TRACE_DIR": str(_mkdir(tmp_path / "trace-resumed")), "KUBETUNE_FAIL_AFTER_STEP": "8"},
    )
    assert f"resumed from {resumed_uri}/checkpoints/step-00000006 at step 6 (epoch 1, micro-batch 0)" in resumed.output
    assert "data fingerprint differs" not in resumed.output
    # ... and failed on purpose after its last checkpoint: exit code 1, one clear last line.
    assert resumed.returncode == 1, resumed.output[-6000:]
    assert resumed.final_line == (
        "kubetune-trainer: error: training: InjectedFailure: injected failure after step 8 (KUBETUNE_FAIL_AFTER_STEP)"
    ), resumed.final_line

    # Same losses and learning rates at the same steps (LoRA dropout included).
    a = _steps(env.metrics(straight_uri))
    b_metrics = env.metrics(resumed_uri)
    b = _steps(b_metrics)
    assert sorted(a) == list(range(1, 9)) and sorted(b) == [7, 8]
    for step in (7, 8):
        assert math.isclose(a[step]["loss"], b[step]["loss"], rel_tol=1e-5), (step, a[step], b[step])
        assert math.isclose(a[step]["lr"], b[step]["lr"], rel_tol=1e-9)
    assert math.isclose(a[8]["evalLoss"], b[8]["evalLoss"], rel_tol=1e-5)
    assert a[8]["loss"] < a[1]["loss"]
    assert [m.get("event") for m in b_metrics if m.get("event") in ("resumed", "failed")] == ["resumed", "failed"]
    # The failure came after the step-8 checkpoint was complete; the half-written step 7 is gone.
    assert {k.split("/")[0] for k in env.keys(f"{resumed_uri}/checkpoints")} == {"step-00000006", "step-00000008"}

    # The resumed run trained on exactly the rows the uninterrupted one used for steps 7 and 8, and the
    # uninterrupted run used no row twice within an epoch (it crosses into a second epoch at step 6).
    straight_trace, resumed_trace = _trace(tmp_path / "trace-straight"), _trace(tmp_path / "trace-resumed")
    assert sorted(straight_trace) == sorted(resumed_trace) == [0, 1]
    for rank, batches in straight_trace.items():
        assert [b["step"] for b in batches] == [s for s in range(1, 9) for _ in range(2)]
        assert resumed_trace[rank] == batches[12:]
        seen: dict[int, set[int]] = defaultdict(set)
        for b in batches:
            assert not seen[b["epoch"]] & set(b["rows"]), f"rank {rank} reused a row in epoch {b['epoch']}"
            seen[b["epoch"]] |= set(b["rows"])
    assert [b["epoch"] for b in straight_trace[0]] == [0] * 12 + [1] * 4

    # The exported adapter names its base, and both it and the merged model generate.
    keys = env.keys(f"{straight_uri}/model")
    assert {"adapter_config.json", "adapter_model.safetensors", "tokenizer.json"} <= set(keys)
    adapter = env.download(f"{straight_uri}/model", tmp_path / "adapter")
    assert json.loads((adapter / "adapter_config.json").read_text())["base_model_name_or_path"] == env.model_uri
    base = env.download(env.model_uri, tmp_path / "base")
    assert_generates(base, adapter)
    merged = env.download(f"{straight_uri}/merged", tmp_path / "merged")
    assert "quantization_config" not in json.loads((merged / "config.json").read_text())
    assert_generates(merged)

    # The trainer's patches landed in the FineTuneJob's status.
    status = wait_for_status(k8s_client, namespace, "straight", lambda s: (s.get("model") or {}).get("uri"))
    assert status["progress"]["step"] == 8 and status["progress"]["totalSteps"] == 8
    assert status["progress"]["percent"] == 100 and status["progress"]["evalLoss"] > 0
    assert status["progress"]["tokensPerSecond"] > 0 and status["progress"]["updatedAt"]
    assert status["data"]["records"] == 60 and status["data"]["sequences"] > 0
    assert [c["step"] for c in status["checkpoints"]] == [8, 6]
    assert status["model"] == {
        "uri": f"{straight_uri}/model",
        "baseUri": env.model_uri,
        "mergedUri": f"{straight_uri}/merged",
        "kind": "adapter",
        "chatTemplate": "chat_template.jinja",
    }  # the tokenizer's, exported with it
    startup = status["startup"]  # the time to first step, by phase (rank 0 reports it after its first step)
    assert startup["timeToFirstStepSeconds"] >= startup["modelLoadSeconds"] + startup["deepspeedInitSeconds"] > 0
    assert {"rayStartSeconds", "dataSeconds", "workerStartSeconds", "firstStepSeconds"} <= set(startup)


def _key(uri: str) -> str:
    return uri.split("/", 3)[3]


def _mkdir(path: Path) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    return path


# ------------------------------------------------------------------------------------------- instruction


@pytest.mark.timeout(600)
def test_instruction_lora_zero3(trainer_env: TrainerEnv, mlflow_server: Any, tmp_path: Path) -> None:
    env = trainer_env
    rng = random.Random(3)
    records = []
    for t in fortunes("linux", limit=50):
        records.append({"prompt": f"Quote number {rng.randint(1, 999)}, please.", "response": t})
    train = put_jsonl(env.client, f"s3://{BUCKET}/data/instruction/train.jsonl", records)
    spec = {
        "model": {"uri": env.model_uri},
        "dataset": {
            "train": train,
            "format": "instruction",
            "validationSplit": 0.15,
            "preprocessing": {"maxSeqLength": 48, "packing": False},
        },
        "training": {
            "method": "lora",
            "lora": {"r": 4, "alpha": 8, "targetModules": ["all-linear"]},
            "maxSteps": 4,
            "perDeviceBatchSize": 2,
            "learningRate": 3e-3,
            "evalIntervalSteps": 4,
            "checkpoint": {"intervalSteps": 4},
            "deepspeed": {"zeroStage": 3, "offload": "cpu"},
        },
        "tracking": {"mlflow": {"uri": mlflow_server.url, "experiment": "tests-instruction"}},
    }
    job = {"name": "instruction-lora-zero3", "namespace": "tests", "uid": "uid-instruction"}
    cfg = env.config("instruction-lora-zero3", spec, job=job)
    run = env.run(cfg)
    assert run.returncode == 0, run.output[-6000:]
    assert "has no effect on a CPU-only run" in run.output
    _assert_tracked(mlflow_server.client(), cfg, env.metrics(cfg["runUri"]))

    adapter = env.download(f"{cfg['runUri']}/model", tmp_path / "adapter")
    from safetensors.torch import load_file

    weights = load_file(adapter / "adapter_model.safetensors")
    lora_b = [t for k, t in weights.items() if "lora_B" in k]
    assert lora_b and all(t.numel() > 0 for t in lora_b)
    assert any(t.abs().sum() > 0 for t in lora_b), "lora_B starts at zero: the gathered adapter was not trained"
    base = env.download(env.model_uri, tmp_path / "base")
    assert_generates(base, adapter)


def _assert_tracked(client: Any, cfg: dict[str, Any], metrics: list[dict]) -> None:
    """The MLflow run of a finished training: tagged with the job, its resolved settings as parameters, the
    step metrics of metrics.jsonl, the evaluation against the base, and where the model is."""
    experiment = client.get_experiment_by_name("tests-instruction")
    runs = client.search_runs([experiment.experiment_id], filter_string="tags.`kubetune.uid` = 'uid-instruction'")
    assert len(runs) == 1
    run = runs[0]
    assert run.info.status == "FINISHED" and run.info.run_name == "instruction-lora-zero3"
    tags, params = run.data.tags, run.data.params
    assert {k: tags[k] for k in ("kubetune.namespace", "kubetune.name", "kubetune.runUri")} == {
        "kubetune.namespace": "tests",
        "kubetune.name": "instruction-lora-zero3",
        "kubetune.runUri": cfg["runUri"],
    }
    assert tags["kubetune.model.uri"] == f"{cfg['runUri']}/model" and tags["kubetune.model.kind"] == "adapter"
    assert params["training.lora.r"] == "4" and params["training.maxSteps"] == "4"
    assert params["training.deepspeed.zeroStage"] == "3" and params["dataset.format"] == "instruction"
    assert int(params["data.trainRecords"]) > 0
    assert not [k for k in params if "credentialsSecret" in k or k.startswith("tracking")]
    steps = _steps(metrics)
    history = {m.step: m.value for m in client.get_metric_history(run.info.run_id, "loss")}
    assert history == pytest.approx({s: steps[s]["loss"] for s in steps}) and sorted(history) == [1, 2, 3, 4]
    assert len(client.get_metric_history(run.info.run_id, "tokensPerSecond")) == 4
    assert [m.step for m in client.get_metric_history(run.info.run_id, "evalLoss")] == [4]
    final = run.data.metrics
    assert final["base.evalLoss"] > 0 and final["fineTuned.evalLoss"] > 0
    assert final["improvement.evalLoss"] == pytest.approx(final["base.evalLoss"] - final["fineTuned.evalLoss"])


# ------------------------------------------------------------------------------------------- classification


@pytest.mark.timeout(600)
def test_classification_full_zero2(trainer_env: TrainerEnv, tmp_path: Path) -> None:
    env = trainer_env
    records = [{"text": t, "label": "computers"} for t in fortunes("computers", limit=40)[20:]]
    records += [{"text": t, "label": "riddles"} for t in fortunes("riddles", limit=20)]
    random.Random(0).shuffle(records)
    train = put_jsonl(env.client, f"s3://{BUCKET}/data/classification/train.jsonl", records)
    spec = {
        "model": {"uri": env.model_uri, "task": "sequence-classification", "numLabels": 2},
        "dataset": {
            "train": train,
            "format": "classification",
            "validationSplit": 0.2,
            "labels": ["computers", "riddles"],
            "preprocessing": {"maxSeqLength": 32},
        },
        "training": {
            "method": "full",
            "maxSteps": 4,
            "perDeviceBatchSize": 4,
            "learningRate": 1e-3,
            "evalIntervalSteps": 2,
            "checkpoint": {"intervalSteps": 4},
            "deepspeed": {"zeroStage": 2},
            "earlyStopping": {"patience": 5},
        },
        # Nothing listens there: the run succeeds all the same, with one warning (kubetune_trainer.tracking).
        "tracking": {"mlflow": {"uri": f"http://127.0.0.1:{free_port()}"}},
    }
    cfg = env.config("classification-full-zero2", spec)
    run = env.run(cfg, local=True)  # this one starts its own Ray, as `--local` runs on a workstation do
    assert run.returncode == 0, run.output[-6000:]
    tracking_warnings = [ln for ln in run.output.splitlines() if "MLflow at http://127.0.0.1:" in ln]
    assert len(tracking_warnings) == 1 and "tracking is off for this run" in tracking_warnings[0], tracking_warnings
    steps = _steps(env.metrics(cfg["runUri"]))
    assert 0.0 <= steps[4]["evalAccuracy"] <= 1.0 and steps[4]["evalLoss"] > 0

    model_dir = env.download(f"{cfg['runUri']}/model", tmp_path / "model")
    import torch
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    model = AutoModelForSequenceClassification.from_pretrained(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    assert model.config.num_labels == 2
    with torch.no_grad():
        logits = model(**tokenizer(["What has keys but no locks?"], return_tensors="pt")).logits
    assert logits.shape == (1, 2)
