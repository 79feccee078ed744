"""The Argo CD health check for FineTuneJob, run as Lua against sample objects.

Argo CD evaluates health scripts with gopher-lua (Lua 5.1), with the object converted from JSON (numbers are
floats). The script runs here under Lua 5.1 and the newest Lua that lupa ships, on objects shaped like what the
operator writes (conditions from kubetune_operator.conditions).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

lupa = pytest.importorskip("lupa", reason="pip install lupa (the test extra) to run the Argo CD health check")

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "deploy" / "argocd" / "health-finetunejob.lua"
CM_PATCH = ROOT / "deploy" / "argocd" / "argocd-cm-patch.yaml"
RUNTIMES = ["lua51", "lua54"]


def _runtime(name: str) -> Any:
    import importlib

    try:
        module = importlib.import_module(f"lupa.{name}")
    except ImportError:
        pytest.skip(f"lupa has no {name} runtime here")
    return module.LuaRuntime(unpack_returned_tuples=True)


def _to_lua(lua: Any, value: Any) -> Any:
    """JSON semantics, as Argo CD hands objects to Lua: dicts and lists become tables, numbers floats."""
    if isinstance(value, dict):
        return lua.table_from({k: _to_lua(lua, v) for k, v in value.items()})
    if isinstance(value, list):
        return lua.table_from([_to_lua(lua, v) for v in value])
    if isinstance(value, bool) or value is None or isinstance(value, str):
        return value
    return float(value)


def health(runtime: str, obj: dict[str, Any]) -> tuple[str, str]:
    lua = _runtime(runtime)
    fn = lua.eval("function(obj) " + SCRIPT.read_text() + "\nend")
    result = fn(_to_lua(lua, json.loads(json.dumps(obj))))
    return result["status"], result["message"]


def job(status: dict[str, Any] | None = None, *, generation: int = 1, **spec: Any) -> dict[str, Any]:
    obj: dict[str, Any] = {
        "apiVersion": "kubetune.io/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "chat", "namespace": "ml", "generation": generation},
        "spec": {"deploy": {"enabled": True}, **spec},
    }
    if status is not None:
        obj["status"] = {"observedGeneration": generation, **status}
    return obj


def cond(type_: str, status: str = "True", reason: str = "", message: str = "") -> dict[str, str]:
    return {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": "2026-01-01T00:00:00Z",
    }


VALID = cond("Validated", "True", "Valid", "spec is valid")

CASES = [
    ("no status yet", job(None), "Progressing", "Waiting for the kubetune operator"),
    (
        "new generation not observed",
        {
            **job({"state": "Training", "conditions": [VALID]}, generation=3),
            "status": {"observedGeneration": 2, "conditions": [VALID]},
        },
        "Progressing",
        "observe generation 3",
    ),
    (
        "pending",
        job(
            {
                "state": "Pending",
                "conditions": [VALID, cond("Training", "False", "JobPending", "waiting for the Ray cluster")],
            }
        ),
        "Progressing",
        "JobPending: waiting for the Ray cluster",
    ),
    (
        "training with progress",
        job(
            {
                "state": "Training",
                "conditions": [VALID, cond("Training", "True", "Running")],
                "progress": {"step": 40, "totalSteps": 100, "percent": 40, "loss": 1.23456},
            }
        ),
        "Progressing",
        "Training: step 40/100 (40%), loss 1.235",
    ),
    (
        "failed with KubeRay's reason",
        job(
            {
                "state": "Failed",
                "conditions": [
                    VALID,
                    cond("Training", "False", "Stopped"),
                    cond("Failed", "True", "DeadlineExceeded", "the RayJob ran past activeDeadlineSeconds"),
                ],
            }
        ),
        "Degraded",
        "DeadlineExceeded: the RayJob ran past activeDeadlineSeconds",
    ),
    (
        "invalid spec",
        job(
            {
                "state": "Failed",
                "conditions": [
                    cond(
                        "Validated",
                        "False",
                        "Invalid",
                        "spec.training.lora: LoRA settings are only allowed with method: lora",
                    )
                ],
            }
        ),
        "Degraded",
        "spec.training.lora",
    ),
    (
        "invalid spec without Failed",
        job({"conditions": [cond("Validated", "False", "Invalid", "spec.model.numLabels: required")]}),
        "Degraded",
        "Invalid: spec.model.numLabels: required",
    ),
    (
        "training field change rejected",
        job(
            {
                "state": "Training",
                "conditions": [
                    VALID,
                    cond("SpecChangeRejected", "True", "TrainingFieldsImmutable", "spec.training.learningRate changed"),
                ],
            }
        ),
        "Degraded",
        "TrainingFieldsImmutable: spec.training.learningRate changed",
    ),
    ("suspended by spec", job({"state": "Pending", "conditions": [VALID]}, suspend=True), "Suspended", "Suspended"),
    (
        "suspended by condition",
        job(
            {
                "state": "Suspended",
                "conditions": [VALID, cond("Suspended", "True", "Suspended", "Kueue suspended the RayJob")],
            }
        ),
        "Suspended",
        "Suspended: Kueue suspended the RayJob",
    ),
    (
        "succeeded, deploying",
        job(
            {
                "state": "Deploying",
                "conditions": [
                    VALID,
                    cond("Succeeded", "True", "JobSucceeded"),
                    cond("Deployed", "False", "Progressing", "0/1 replicas ready"),
                ],
            }
        ),
        "Progressing",
        "Progressing: 0/1 replicas ready",
    ),
    (
        "succeeded, deploy not started",
        job({"state": "Succeeded", "conditions": [VALID, cond("Succeeded", "True", "JobSucceeded")]}),
        "Progressing",
        "deploying",
    ),
    (
        "deployed",
        job(
            {
                "state": "Deployed",
                "conditions": [VALID, cond("Succeeded"), cond("Deployed", "True", "Available")],
                "endpoint": {"url": "http://chat.ml.svc:8000/v1", "model": "chat"},
            }
        ),
        "Healthy",
        "Serving chat at http://chat.ml.svc:8000/v1",
    ),
    (
        "succeeded without deploy",
        {
            **job(
                {
                    "state": "Succeeded",
                    "conditions": [VALID, cond("Succeeded", "True", "JobSucceeded")],
                    "model": {"uri": "s3://runs/ml/chat/model"},
                }
            ),
            "spec": {"deploy": {"enabled": False}},
        },
        "Healthy",
        "Training succeeded; model at s3://runs/ml/chat/model",
    ),
    (
        "succeeded, not improved enough to deploy",
        job(
            {
                "state": "Succeeded",
                "conditions": [
                    VALID,
                    cond("Succeeded"),
                    cond("Deployed", "False", "NotImproved", "evalLoss improved by 0.001 < 0.01"),
                ],
            }
        ),
        "Healthy",
        "not deployed: NotImproved",
    ),
    (
        "succeeded, scaled to zero",
        job(
            {
                "state": "Succeeded",
                "conditions": [
                    VALID,
                    cond("Succeeded"),
                    cond("Deployed", "False", "ScaledToZero", "spec.deploy.replicas is 0"),
                ],
            }
        ),
        "Healthy",
        "not deployed: ScaledToZero",
    ),
    (
        "succeeded, serving broken",
        job(
            {
                "state": "Deploying",
                "conditions": [
                    VALID,
                    cond("Succeeded"),
                    cond("Deployed", "False", "ReplicaFailure", "pods cannot be created"),
                ],
            }
        ),
        "Degraded",
        "serving failed: ReplicaFailure: pods cannot be created",
    ),
    (
        "succeeded, awaiting evaluation",
        job(
            {
                "state": "Deploying",
                "conditions": [
                    VALID,
                    cond("Succeeded"),
                    cond("Deployed", "False", "AwaitingEvaluation", "waiting for the eval report"),
                ],
            }
        ),
        "Progressing",
        "AwaitingEvaluation",
    ),
    (
        "failure wins over suspend",
        job({"state": "Failed", "conditions": [VALID, cond("Failed", "True", "AppFailed", "exit 1")]}, suspend=True),
        "Degraded",
        "AppFailed: exit 1",
    ),
]


@pytest.mark.parametrize("runtime", RUNTIMES)
@pytest.mark.parametrize(("name", "obj", "status", "message"), CASES, ids=[c[0] for c in CASES])
def test_health(runtime: str, name: str, obj: dict[str, Any], status: str, message: str) -> None:
    got_status, got_message = health(runtime, obj)
    assert got_status == status, f"{name}: {got_status} ({got_message})"
    assert message in got_message, f"{name}: {got_message!r}"


def test_statuses_are_argo_cd_health_codes() -> None:
    assert {c[2] for c in CASES} == {"Healthy", "Progressing", "Degraded", "Suspended"}


def test_argocd_cm_patch_embeds_the_script_verbatim() -> None:
    data = yaml.safe_load(CM_PATCH.read_text())["data"]
    assert data["resource.customizations.health.kubetune.io_FineTuneJob"] == SCRIPT.read_text()
    ignore = yaml.safe_load(data["resource.customizations.ignoreDifferences.kubetune.io_FineTuneJob"])
    assert ignore["managedFieldsManagers"] == ["kopf"]


def test_condition_types_match_the_operator() -> None:
    """Every condition type the script reads is one the operator writes."""
    import re

    from kubetune_operator import conditions

    used = set(re.findall(r'condition\(status, "(\w+)"\)|is_true\(status, "(\w+)"\)', SCRIPT.read_text()))
    names = {a or b for a, b in used}
    assert names <= set(conditions.ORDER), names - set(conditions.ORDER)


def test_deployed_reasons_match_the_operator() -> None:
    """The reasons the script treats as 'nothing to serve on purpose' are the operator's."""
    from kubetune_operator import conditions

    on_purpose = getattr(conditions, "NOT_SERVING_ON_PURPOSE", None)
    if on_purpose is None:
        pytest.skip("this operator has no serving reasons yet")
    import re

    block = re.search(r"NOT_SERVING_ON_PURPOSE = \{([^}]*)\}", SCRIPT.read_text()).group(1)
    assert set(re.findall(r"(\w+) = true", block)) == set(on_purpose)
