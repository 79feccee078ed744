"""The spec-change policy and the admission webhook's decisions (pure; the webhook runs for real in
test_op_admission.py)."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kubetune import api
from kubetune_operator import policy
from kubetune_operator.settings import Settings, SettingsError
from kubetune_operator.webhook import admission_errors

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]


def manifest() -> dict:
    return yaml.safe_load((ROOT / "examples" / "lora-chat.yaml").read_text())


def started(m: dict) -> dict:
    return {**m, "status": {"specHash": policy.spec_hash(m["spec"]), "rayJob": {"name": "lora-chat"}}}


def test_hash_covers_training_fields_only() -> None:
    m = manifest()
    h = policy.spec_hash(m["spec"])
    live = copy.deepcopy(m["spec"])
    live.update(suspend=True, backoffLimit=3, activeDeadlineSeconds=5)
    live["deploy"]["replicas"] = 4
    assert policy.spec_hash(live) == h
    changed = copy.deepcopy(m["spec"])
    changed["training"]["learningRate"] = 0.001
    assert policy.spec_hash(changed) != h


def test_changes_are_named_by_wire_path() -> None:
    m = manifest()
    a = api.parse_spec(m["spec"])
    spec = copy.deepcopy(m["spec"])
    spec["training"]["lora"]["r"] = 8
    spec["resources"]["workers"] = 4
    spec["deploy"]["replicas"] = 3
    assert policy.training_changes(a, api.parse_spec(spec)) == ["spec.training.lora.r", "spec.resources.workers"]


def test_writing_a_default_out_is_not_a_change() -> None:
    m = manifest()
    spec = copy.deepcopy(m["spec"])
    spec["training"]["seed"] = 42  # the default
    assert policy.spec_hash(spec) != policy.spec_hash(m["spec"])
    assert policy.training_changes(api.parse_spec(m["spec"]), api.parse_spec(spec)) == []


def test_webhook_admits_valid_and_live_changes() -> None:
    m = manifest()
    assert admission_errors("CREATE", m, None) == []
    new = copy.deepcopy(m)
    new["spec"]["suspend"] = True
    new["spec"]["deploy"]["replicas"] = 2
    assert admission_errors("UPDATE", new, started(m)) == []
    assert admission_errors("DELETE", None, m) == []


def test_webhook_refuses_training_changes_once_started_only() -> None:
    m = manifest()
    new = copy.deepcopy(m)
    new["spec"]["training"]["learningRate"] = 0.001
    assert admission_errors("UPDATE", new, m) == []  # not started: free to change
    errors = admission_errors("UPDATE", new, started(m))
    assert errors and errors[0][0] == "spec.training.learningRate"
    assert "immutable once training has started" in errors[0][1]


@pytest.mark.parametrize(
    ("patch", "path"),
    [
        (lambda s: s["training"].update(method="full"), "spec.training.lora"),
        (lambda s: s["model"].update(task="sequence-classification"), "spec.model.numLabels"),
        (lambda s: s["dataset"].update(validationSplit=0.1), "spec.dataset.validationSplit"),
        (lambda s: s["dataset"].update(accessKeyId="AKIAEXAMPLEKEY123456"), "spec.dataset.accessKeyId"),
        (lambda s: s["dataset"].update(train="s3://AKIAKEY:supersecret@bucket/x"), "spec.dataset.train"),
    ],
)
def test_webhook_names_the_field_and_never_echoes_secrets(patch, path) -> None:
    m = manifest()
    patch(m["spec"])
    errors = admission_errors("CREATE", m, None)
    assert errors and any(p == path for p, _ in errors), errors
    text = repr(errors)
    assert "AKIA" not in text and "supersecret" not in text


def test_webhook_checks_the_name() -> None:
    m = manifest()
    m["metadata"]["name"] = "dotted.name"
    assert admission_errors("CREATE", m, None)[0][0] == "metadata.name"


def test_settings_from_env() -> None:
    s = Settings.from_env(
        {
            "KUBETUNE_NAMESPACES": "a, b",
            "KUBETUNE_WEBHOOK": "true",
            "KUBETUNE_METRICS_PORT": "0",
            "KUBETUNE_TRAINER_IMAGE": "reg.example/trainer@sha256:abc",
        }
    )
    assert s.namespaces == ("a", "b") and s.webhook and s.metrics_port == 0
    assert s.trainer_image == "reg.example/trainer@sha256:abc"
    assert Settings.from_env({}).trainer_image.endswith(":0.1.0")


@pytest.mark.parametrize(
    ("env", "var"),
    [
        ({"KUBETUNE_WEBHOOK_PORT": "70000"}, "KUBETUNE_WEBHOOK_PORT"),
        ({"KUBETUNE_WEBHOOK": "maybe"}, "KUBETUNE_WEBHOOK"),
        ({"KUBETUNE_TRAINER_IMAGE": "trainer:latest"}, "KUBETUNE_TRAINER_IMAGE"),
        ({"KUBETUNE_INFERENCE_IMAGE": "localhost:5000/vllm"}, "KUBETUNE_INFERENCE_IMAGE"),
    ],
)
def test_settings_errors_name_the_variable(env, var) -> None:
    with pytest.raises(SettingsError, match=var):
        Settings.from_env(env)
