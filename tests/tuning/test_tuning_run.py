"""A tuning job end to end on CPU: 4 Ray Tune trials over learning rate and LoRA rank, ASHA early stopping,
every trial in status (through a real kube-apiserver, as the trainer's ServiceAccount), the best trial's
model exported as the job's, and the evaluation report with base vs fine-tuned figures on the same held-out
data.

Deterministic by construction: a grid over learningRate x lora.r (nested loops over the fields in name order),
so the two trials with the absurd learning rate (1e-7: after two steps the adapter has not moved, the loss is
the base model's) are trials 2 and 3. With 2 trials at a time they start only after one of the sane trials
has ended, so when they reach ASHA's first rung (step 2) a better result is already recorded there (any sane
trial's step-2 loss is below the base model's), and ASHA stops them. (A huge learning rate is no good here:
on this random tiny model LoRA with lr 0.5 does not diverge, it learns the unigram statistics faster.)
"""

from __future__ import annotations

import json
import math
from typing import Any

import pytest

from kubetune import api
from tests.support.k8s import install_finetunejob_crd, trainer_kubeconfig, wait_for_status
from tests.support.trainer import BUCKET, TrainerEnv, fortunes, put_jsonl

pytestmark = [pytest.mark.training, pytest.mark.integration]

GOOD_LR, BAD_LR = 0.01, 1e-7  # 0.01 lowers the held-out loss at every step (0.03 already overshoots)
STEPS = 6


def _spec(env: TrainerEnv) -> dict[str, Any]:
    data = put_jsonl(
        env.client, f"s3://{BUCKET}/data/tuning/fortunes.jsonl", [{"text": t} for t in fortunes("computers", limit=80)]
    )
    return {
        "model": {"uri": env.model_uri},
        "dataset": {
            "train": data,
            "format": "completion",
            "validationSplit": 0.15,
            "preprocessing": {"maxSeqLength": 32},
            "endpoint": env.s3.endpoint_url,
        },
        "training": {
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0},
            "maxSteps": 50,
            "perDeviceBatchSize": 2,
            "learningRate": 1e-3,
            "warmupRatio": 0.0,
            "scheduler": "constant",
            "evalIntervalSteps": 2,
            "checkpoint": {"intervalSteps": 100, "keep": 1},
        },
        "tuning": {
            "objective": {"metric": "evalLoss", "mode": "min"},
            "trials": 4,
            "maxConcurrentTrials": 2,
            "algorithm": "grid",
            "earlyStopping": "asha",
            "maxStepsPerTrial": STEPS,
            # Nested loops over the fields in name order (learningRate, lora.r): trials 0,1 = GOOD_LR; 2,3 = BAD_LR.
            "searchSpace": {
                "lora.r": {"type": "choice", "values": [2, 4]},
                "learningRate": {"type": "choice", "values": [GOOD_LR, BAD_LR]},
            },
        },
        "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "1"},
        "output": {"uri": f"s3://{BUCKET}/runs"},
        "deploy": {"enabled": True, "minImprovement": 0.0},
    }


def _create_job(k8s_client: Any, namespace: str, name: str, spec: dict[str, Any]) -> dict[str, Any]:
    from kubernetes import client

    body = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": name, "namespace": namespace},
        "spec": spec,
    }
    return client.CustomObjectsApi(k8s_client).create_namespaced_custom_object(
        api.GROUP, api.VERSION, namespace, api.PLURAL, body
    )


@pytest.mark.timeout(900)
def test_tuning_grid_with_asha_exports_the_best_trial(
    tuning_env: TrainerEnv, control_plane, k8s_client, namespace
) -> None:
    env = tuning_env
    spec = _spec(env)
    install_finetunejob_crd(control_plane)
    job = _create_job(k8s_client, namespace, "tuned", spec)  # the CRD (and its schema) takes the tuning spec
    kubeconfig = trainer_kubeconfig(control_plane, k8s_client, job)
    cfg = env.config(
        "tuned",
        spec,
        reporting={"kubernetes": True, "minIntervalSeconds": 0},
        job={"name": "tuned", "namespace": namespace, "uid": job["metadata"]["uid"]},
    )
    run_uri = cfg["runUri"] = f"s3://{BUCKET}/runs/{namespace}/tuned"
    progress_file = env.workdir / f"progress-{namespace}.jsonl"

    run = env.run(cfg, env={"KUBECONFIG": str(kubeconfig), "KUBETUNE_PROGRESS_FILE": str(progress_file)}, timeout=720)
    assert run.returncode == 0, run.output[-8000:]
    assert "succeeded" in run.final_line and "best of 4 trials" in run.final_line, run.final_line

    # ---- every trial is in the status, short and readable, through the API server
    status = wait_for_status(
        k8s_client, namespace, "tuned", lambda s: s.get("bestTrial") and (s.get("evaluation") or {}).get("reportUri")
    )
    trials = {t["id"]: t for t in status["trials"]}
    assert sorted(trials) == ["trial-00", "trial-01", "trial-02", "trial-03"], status["trials"]
    for t in trials.values():
        assert set(t) <= {"id", "params", "objective", "state", "step"}, t
        assert set(t["params"]) == {"lora.r", "learningRate"}
    assert [trials[t]["params"] for t in sorted(trials)] == [
        {"learningRate": GOOD_LR, "lora.r": 2},
        {"learningRate": GOOD_LR, "lora.r": 4},
        {"learningRate": BAD_LR, "lora.r": 2},
        {"learningRate": BAD_LR, "lora.r": 4},
    ]

    # ---- ASHA stopped the absurd learning rates early; at least one sane trial trained to the end
    for tid in ("trial-02", "trial-03"):
        assert trials[tid]["state"] == "EARLY_STOPPED", status["trials"]
        assert trials[tid]["step"] < STEPS
    finished = [t for t in trials.values() if t["state"] == "TERMINATED"]
    assert finished and all(t["step"] == STEPS for t in finished), status["trials"]
    assert {t["id"] for t in finished} <= {"trial-00", "trial-01"}

    # ---- the best trial is the best recorded objective, and its model is the job's
    best = trials[status["bestTrial"]]
    recorded = [t["objective"] for t in trials.values() if t.get("objective") is not None]
    assert best["state"] == "TERMINATED" and best["objective"] == min(recorded), status["trials"]
    assert status["model"] == {"uri": f"{run_uri}/model", "kind": "adapter", "baseUri": env.model_uri}
    adapter = env.get_json(f"{run_uri}/model/adapter_config.json")
    assert adapter["r"] == best["params"]["lora.r"]
    assert adapter["base_model_name_or_path"] == env.model_uri
    assert status["progress"]["percent"] == 100 and status["progress"]["trial"] == best["id"]

    assert [c["uri"] for c in status["checkpoints"]] == [f"{run_uri}/trials/{best['id']}/checkpoints/step-{STEPS:08d}"]

    # ---- each trial checkpointed under its own prefix; early-stopped ones exported nothing
    for tid, t in trials.items():
        keys = env.keys(f"{run_uri}/trials/{tid}")
        assert "params.json" in keys
        if t["state"] == "TERMINATED":
            assert f"checkpoints/step-{STEPS:08d}/_COMPLETE" in keys, keys
            assert "model/adapter_config.json" in keys and "eval/report.json" in keys
            assert env.get_json(f"{run_uri}/trials/{tid}/model/adapter_config.json")["r"] == t["params"]["lora.r"]
        else:
            # Stopped at ASHA's first rung (step 2): its workers waited there for Tune's verdict and ended
            # on it, so nothing was trained, checkpointed or exported after it (tune_verdicts).
            assert t["step"] == 2, status["trials"]
            assert not [k for k in keys if k.startswith(("model/", "checkpoints/", "eval/"))], keys
            # Its own metrics, when its workers ended before Tune's clean-up took them: no step past the rung.
            own = env.metrics(f"{run_uri}/trials/{tid}") if "metrics.jsonl" in keys else []
            assert all(m["step"] <= 2 for m in own if "step" in m), own

    # ---- the evaluation: base vs fine-tuned on the same held-out data, in S3 and summarised in status
    ev = status["evaluation"]
    report = env.get_json(ev["reportUri"])
    assert ev["reportUri"] == f"{run_uri}/eval/report.json"
    assert ev["metric"] == "evalLoss" and report["metric"] == "evalLoss"
    assert ev["base"] == pytest.approx(report["base"]["evalLoss"])
    assert ev["fineTuned"] == pytest.approx(report["fineTuned"]["evalLoss"]) == pytest.approx(best["objective"])
    assert ev["improvement"] == pytest.approx(ev["base"] - ev["fineTuned"])
    assert ev["improvement"] > 0, ev  # a sane LoRA run beats the random base on its own held-out data
    assert report["base"]["perplexity"] == pytest.approx(math.exp(report["base"]["evalLoss"]), rel=1e-6)
    assert report["heldOut"]["sequences"] > 0 and "0.15 of" in report["heldOut"]["source"]
    assert report["bestTrial"] == best["id"] and report["trial"]["id"] == best["id"]
    assert [t["id"] for t in report["trials"]] == sorted(trials)
    assert len(report["samples"]) == 3
    for sample in report["samples"]:
        assert sample["prompt"] and isinstance(sample["base"], str) and isinstance(sample["fineTuned"], str)
    # Every trial measured against the same base figures (one held-out set, one base model).
    for t in finished:
        trial_report = env.get_json(f"{run_uri}/trials/{t['id']}/eval/report.json")
        assert trial_report["base"] == report["base"]
        assert trial_report["heldOut"]["dataFingerprint"] == report["heldOut"]["dataFingerprint"]
        assert trial_report["fineTuned"]["evalLoss"] == pytest.approx(t["objective"])

    # ---- the operator's deployment gate reads exactly these fields
    from kubetune_operator.reconcile_deploy import gate

    assert gate(api.parse_spec(spec), ev) is None  # improved: deployed
    strict = api.parse_spec({**spec, "deploy": {"enabled": True, "minImprovement": ev["improvement"] + 1.0}})
    reason, message = gate(strict, ev)
    assert reason == "NotImproved" and "evalLoss" in message

    # ---- the job's metrics: tuning events and the best trial's curve; each trial has its own
    metrics = env.metrics(run_uri)
    events = [m.get("event") for m in metrics]
    assert "tuningStarted" in events and "tuningFinished" in events
    assert events.count("trialEnded") == 4
    curve = [m for m in metrics if "loss" in m and "event" not in m]
    assert curve and {m["trial"] for m in curve} == {best["id"]}
    assert max(m["step"] for m in curve) == STEPS
    results = [m for m in metrics if m.get("event") == "trialResult"]
    assert {m["trial"] for m in results} == set(trials)  # every evaluation of every trial, killed ones too
    for tid, t in trials.items():
        assert max(m["step"] for m in results if m["trial"] == tid) == t["step"]
        if t["state"] == "TERMINATED":  # a trial Tune stopped may be killed before it writes its own file
            assert max(m["step"] for m in env.metrics(f"{run_uri}/trials/{tid}") if "step" in m) == STEPS

    # ---- kubetune status and plot --trials from exactly these
    from kubetune_cli.plot import plot_trials, trial_curves
    from kubetune_cli.status import render

    text = render({"metadata": {"name": "tuned", "namespace": namespace}, "status": status})
    assert f"best {best['id']}" in text and "EARLY_STOPPED" in text and "eval      evalLoss: base" in text
    curves = trial_curves(
        metrics, {tid: env.metrics(f"{run_uri}/trials/{tid}") for tid in trials if trials[tid]["state"] == "TERMINATED"}
    )
    assert set(curves) == set(trials)
    png = plot_trials(
        curves,
        env.workdir / "trials.png",
        "tuned",
        best=best["id"],
        states={tid: t["state"] for tid, t in trials.items()},
        baseline=ev["base"],
    )
    assert png.stat().st_size > 10_000

    # ---- the local progress file (kubetune run's view) saw the trials too
    lines = [json.loads(x) for x in progress_file.read_text().splitlines()]
    assert any("trials" in (x.get("status") or {}) for x in lines)
    assert any(((x.get("status") or {}).get("progress") or {}).get("trial") for x in lines)
