"""Invalid manifests are refused by `kubectl apply` with a message naming the field, and nothing is created:
type, range, enum, pattern and required errors by the API server (the CRD's schema), cross-field rules, the
name and inline credentials by the operator's admission webhook (served in-process on 127.0.0.1). The
spec-change policy is enforced by the same webhook on updates.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
from op_support import EXAMPLES, load_example, wait_for

from kubetune_operator import names
from kubetune_operator.kube import FINETUNEJOB, RAYJOB

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

SECRET = "wJalrXUtnFEMI-K7MDENG-bPxRfiCYEXAMPLEKEY"


def _set(path: str, value: Any) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        node = m
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    return apply


def _delete(path: str) -> Callable[[dict], None]:
    def apply(m: dict) -> None:
        node = m
        *parents, leaf = path.split(".")
        for p in parents:
            node = node[p]
        del node[leaf]

    return apply


# (id, how to break lora-chat, the field the error must name, who refuses it)
INVALID = [
    ("wrong-type", _set("spec.training.epochs", "two"), "spec.training.epochs", "schema"),
    ("wrong-type-int", _set("spec.resources.gpusPerWorker", 1.5), "spec.resources.gpusPerWorker", "schema"),
    ("negative-lr", _set("spec.training.learningRate", -0.001), "spec.training.learningRate", "schema"),
    ("negative-backoff", _set("spec.backoffLimit", -1), "spec.backoffLimit", "schema"),
    ("unknown-method", _set("spec.training.method", "qlora"), "spec.training.method", "schema"),
    ("unknown-format", _set("spec.dataset.format", "csv"), "spec.dataset.format", "schema"),
    ("missing-dataset", _delete("spec.dataset"), "spec.dataset", "schema"),
    ("zero-workers", _set("spec.resources.workers", 0), "spec.resources.workers", "schema"),
    ("malformed-s3-uri", _set("spec.dataset.train", "https://bucket/train.jsonl"), "spec.dataset.train", "schema"),
    ("bad-quantity", _set("spec.resources.memoryPerWorker", "lots"), "spec.resources.memoryPerWorker", "schema"),
    ("lora-with-full", _set("spec.training.method", "full"), "spec.training.lora", "webhook"),
    (
        "classification-without-labels",
        _set("spec.model.task", "sequence-classification"),
        "spec.model.numLabels",
        "webhook",
    ),
    ("validation-twice", _set("spec.dataset.validationSplit", 0.1), "spec.dataset.validationSplit", "webhook"),
    ("zero-max-chars", _set("spec.dataset.preprocessing.maxChars", 0), "spec.dataset.preprocessing.maxChars", "schema"),
    (
        "max-below-min-chars",
        lambda m: (
            _set("spec.dataset.preprocessing.minChars", 100)(m),
            _set("spec.dataset.preprocessing.maxChars", 50)(m),
        ),
        "spec.dataset.preprocessing.maxChars",
        "webhook",
    ),
    # The CRD itself refuses inline keys (before the webhook is asked), naming the field, never the value.
    ("inline-credentials", _set("spec.dataset.secretAccessKey", SECRET), "spec.dataset.secretAccessKey", "schema"),
    (
        "unknown-tunable",
        _set("spec.tuning", {"searchSpace": {"optimizer": {"type": "choice", "values": [1]}}}),
        "spec.tuning.searchSpace.optimizer",
        "webhook",
    ),
    ("dotted-name", _set("metadata.name", "chat.v2"), "metadata.name", "webhook"),
]


def names_field(message: str, path: str) -> bool:
    """The API server says `spec.training.epochs`; kubectl's own schema check (once the server publishes the
    CRD's OpenAPI) says `FineTuneJob.spec.training.epochs`, or `missing required field "dataset" in
    ...FineTuneJob.spec`. Either names the field."""
    parent, _, leaf = path.rpartition(".")
    return path in message or (f"FineTuneJob.{parent}" in message and f'"{leaf}"' in message)


@pytest.mark.parametrize(("case", "breaker", "field", "by"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_manifest_is_refused_naming_the_field(
    case: str,
    breaker: Callable[[dict], None],
    field: str,
    by: str,
    operator_with_webhook: Any,
    kubectl: Any,
    namespace: str,
) -> None:
    manifest = load_example("lora-chat")
    breaker(manifest)
    proc = kubectl.apply(manifest, namespace, check=False)
    assert proc.returncode != 0, f"{case} was accepted"
    assert names_field(proc.stderr, field), proc.stderr
    if by == "webhook":
        assert "denied the request" in proc.stderr, proc.stderr
    else:
        assert "denied the request" not in proc.stderr, proc.stderr  # the schema caught it first
    assert SECRET not in proc.stderr
    # Nothing was created: no job, and so no children.
    assert kubectl.names("finetunejobs,configmaps,roles,rolebindings,rayjobs", namespace) == []


def test_training_change_after_start_is_refused_live_change_is_not(
    operator_with_webhook: Any, kubectl: Any, kube: Any, namespace: str
) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    rj = wait_for("the RayJob", lambda: kube.get(RAYJOB, namespace, names.ray_job("lora-chat")))
    wait_for(
        "status.specHash", lambda: (kube.get(FINETUNEJOB, namespace, "lora-chat").get("status") or {}).get("specHash")
    )

    changed = load_example("lora-chat")
    changed["spec"]["training"]["learningRate"] = 0.001
    changed["spec"]["resources"]["workers"] = 4
    proc = kubectl.apply(changed, namespace, check=False)
    assert proc.returncode != 0
    assert "spec.training.learningRate" in proc.stderr and "spec.resources.workers" in proc.stderr
    assert "immutable once training has started" in proc.stderr

    live = copy.deepcopy(load_example("lora-chat"))
    live["spec"]["suspend"] = True
    live["spec"]["deploy"]["replicas"] = 2
    kubectl.apply(live, namespace)
    after = wait_for(
        "suspend on the RayJob",
        lambda: (r := kube.get(RAYJOB, namespace, rj["metadata"]["name"]))["spec"]["suspend"] and r,
    )
    assert after["metadata"]["uid"] == rj["metadata"]["uid"]
    assert after["spec"]["rayClusterSpec"] == rj["spec"]["rayClusterSpec"]
