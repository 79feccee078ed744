"""Evaluation of a plain (untuned) job and the deployment gate, end to end against the real API server.

The operator runs in-process; the test plays KubeRay (kubetune_cli.localenv.kuberay) and runs the trainer itself,
as the RayJob's entrypoint would: with the config from the operator's ConfigMap, reporting as the operator's
trainer ServiceAccount. The fine-tune is made not to improve (a learning rate of 1e-9: the weights barely
move), so the operator's gate, fed the `status.evaluation` exactly as the trainer wrote it, must refuse to
deploy and say why (Deployed=False, NotImproved, with the base and fine-tuned figures).
"""

from __future__ import annotations

import importlib.util
import json
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune import api
from tests.support.k8s import install_finetunejob_crd
from tests.support.trainer import BUCKET, TrainerEnv, fortunes, put_jsonl
from tests.support.waiting import wait_for

pytestmark = [pytest.mark.training, pytest.mark.integration]

OPERATOR_TESTS = Path(__file__).resolve().parents[1] / "operator"


def _operator_fixtures() -> Any:
    """tests/operator/conftest.py's InProcessOperator (the operator in a thread, as its tests run it)."""
    sys.path.insert(0, str(OPERATOR_TESTS))
    spec = importlib.util.spec_from_file_location("kubetune_operator_test_fixtures", OPERATOR_TESTS / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    assert spec.loader is not None
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def operator(kubeconfig: Path, control_plane: Any) -> Iterator[Any]:
    from kubetune_operator.settings import Settings

    install_finetunejob_crd(control_plane)
    op = _operator_fixtures().InProcessOperator(kubeconfig, Settings(metrics_port=0, health_port=0)).start()
    yield op
    op.stop()


@pytest.fixture(scope="module")
def kuberay(kubeconfig: Path) -> Iterator[Any]:
    from kubetune_cli.localenv.kuberay import KubeRay

    with KubeRay(kubeconfig) as kr:
        yield kr


def _wait(what: str, fn: Any, timeout: float = 60.0) -> Any:
    return wait_for(what, fn, timeout, interval=0.3)


@pytest.mark.timeout(900)
def test_a_fine_tune_that_does_not_improve_is_not_deployed(
    tuning_env: TrainerEnv, operator: Any, kuberay: Any, control_plane: Any, namespace: str
) -> None:
    from kubetune_operator import names
    from kubetune_operator.builders.config import CONFIG_KEY
    from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB, Kube, load_configuration

    env = tuning_env
    kube = Kube(load_configuration(control_plane.kubeconfig))
    data = put_jsonl(
        env.client, f"s3://{BUCKET}/data/gate/fortunes.jsonl", [{"text": t} for t in fortunes("computers", limit=60)]
    )
    name = "no-gain"
    kube.create(
        {
            "apiVersion": api.API_VERSION,
            "kind": api.KIND,
            "metadata": {"name": name, "namespace": namespace},
            "spec": {
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
                    "lora": {"r": 4, "alpha": 8, "dropout": 0.0},
                    "maxSteps": 3,
                    "perDeviceBatchSize": 2,
                    "learningRate": 1e-9,
                    "evalIntervalSteps": 3,
                    "checkpoint": {"intervalSteps": 100, "keep": 1},
                },
                "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "1"},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "deploy": {"enabled": True, "minImprovement": 0.05},
            },
        }
    )

    # The operator made the trainer's config, identity and RayJob; KubeRay starts the job.
    rj = _wait("the RayJob", lambda: kube.get(RAYJOB, namespace, names.ray_job(name)))
    cm = _wait("the config", lambda: kube.get(CONFIGMAP, namespace, names.config_map(name)))
    config = json.loads(cm["data"][CONFIG_KEY])
    assert config["reporting"]["kubernetes"] is True
    config["reporting"]["minIntervalSeconds"] = 0
    kubeconfig = control_plane.kubeconfig_for_service_account(namespace, names.service_account(name), create=False)
    kuberay.start(namespace, rj["metadata"]["name"])

    run = env.run(config, env={"KUBECONFIG": str(kubeconfig)}, timeout=600)
    assert run.returncode == 0, run.output[-6000:]
    kuberay.succeed(namespace, rj["metadata"]["name"])

    # The trainer's evaluation in status: base vs fine-tuned on the same held-out data, and the report.
    def evaluated() -> dict | None:
        st = (kube.get(FINETUNEJOB, namespace, name) or {}).get("status") or {}
        return st if (st.get("evaluation") or {}).get("reportUri") and st.get("model") else None

    status = _wait("status.evaluation", evaluated)
    ev = status["evaluation"]
    run_uri = config["runUri"]
    assert ev["reportUri"] == f"{run_uri}/eval/report.json" and ev["metric"] == "evalLoss"
    assert abs(ev["improvement"]) < 0.01, ev  # 1e-9 moves nothing: no real improvement
    report = env.get_json(ev["reportUri"])
    assert report["base"]["evalLoss"] == pytest.approx(ev["base"])
    assert report["fineTuned"]["evalLoss"] == pytest.approx(ev["fineTuned"]) and report["fineTuned"]["step"] == 3
    assert report["trial"] is None and report["model"]["uri"] == f"{run_uri}/model"
    assert report["heldOut"]["sequences"] > 0
    assert len(report["samples"]) == 3 and all(s["prompt"] and s["reference"] for s in report["samples"])
    # Greedy decoding of (practically) the same weights: the fine-tune says what the base says.
    assert [s["base"] for s in report["samples"]] == [s["fineTuned"] for s in report["samples"]]
    assert env.get_json(f"{run_uri}/eval/base.json")["metrics"]["evalLoss"] == pytest.approx(ev["base"])

    # The operator's gate: not deployed, and the condition says why, with the trainer's figures.
    def not_improved() -> dict | None:
        body = kube.get(FINETUNEJOB, namespace, name) or {}
        conds = {c["type"]: c for c in (body.get("status") or {}).get("conditions") or []}
        c = conds.get("Deployed") or {}
        return c if (c.get("status"), c.get("reason")) == ("False", "NotImproved") else None

    cond = _wait("Deployed=False NotImproved", not_improved, timeout=90)
    msg = cond["message"]
    assert "minImprovement 0.05" in msg and "evalLoss" in msg, msg
    assert f"base {ev['base']:.4g}" in msg and f"fine-tuned {ev['fineTuned']:.4g}" in msg, msg
    assert (kube.get(FINETUNEJOB, namespace, name).get("status") or {}).get("endpoint") is None

    from kubetune_cli.status import render

    text = render(kube.get(FINETUNEJOB, namespace, name))
    assert "eval      evalLoss: base" in text and "NotImproved" in text, text
