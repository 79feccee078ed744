"""Without the admission webhook the operator still enforces everything, after the fact: cross-field errors
become Validated=False / Failed=True (reason Invalid) with an Event, and nothing is built; a training-field
change after the start leaves the RayJob alone and sets SpecChangeRejected. The policy is in
kubetune_operator.policy.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from op_support import EXAMPLES, condition, events, get_columns, load_example, wait_for

from kubetune_operator import names
from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]


def job(kube: Any, ns: str, name: str) -> dict:
    return kube.get(FINETUNEJOB, ns, name)


def wait_cond(kube: Any, ns: str, name: str, type_: str, status: str, reason: str | None = None) -> dict:
    def ok() -> dict | None:
        j = job(kube, ns, name)
        c = condition(j, type_)
        return j if c.get("status") == status and (reason is None or c.get("reason") == reason) else None

    return wait_for(f"{type_}={status} ({reason}) on {name}", ok)


@pytest.mark.parametrize(
    ("change", "field"),
    [
        (lambda s: s["training"].update(method="full"), "spec.training.lora"),
        (lambda s: s["model"].update(task="sequence-classification", numLabels=3), "spec.dataset.format"),
        (lambda s: s["dataset"].update(validationSplit=0.2), "spec.dataset.validationSplit"),
    ],
    ids=["lora-with-full", "classification-task-chat-data", "validation-twice"],
)
def test_cross_field_error_becomes_a_condition_and_nothing_is_built(
    change: Any, field: str, operator: Any, kubectl: Any, kube: Any, namespace: str
) -> None:
    m = load_example("lora-chat")
    change(m["spec"])
    kubectl.apply(m, namespace)  # the schema alone cannot see it
    j = wait_cond(kube, namespace, "lora-chat", "Failed", "True", "Invalid")
    assert condition(j, "Validated")["status"] == "False"
    assert condition(j, "Validated")["message"].startswith(field) or field in condition(j, "Validated")["message"]
    assert field in condition(j, "Failed")["message"]
    assert j["status"]["state"] == "Failed" and j["status"]["observedGeneration"] == 1
    assert get_columns(kubectl, namespace, "lora-chat")["STATUS"] == "Failed"
    warnings = [(r, msg) for t, r, msg in events(kubectl, namespace, "lora-chat") if t == "Warning"]
    assert warnings and warnings[0][0] == "Invalid" and field in warnings[0][1]
    assert kubectl.names("configmaps,roles,rolebindings,rayjobs", namespace) == []

    # Fixing the spec builds the job, and the failure is gone.
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    wait_for("the RayJob", lambda: kube.get(RAYJOB, namespace, names.ray_job("lora-chat")))
    j = wait_cond(kube, namespace, "lora-chat", "Validated", "True", "Valid")
    j = wait_for(
        "Failed cleared",
        lambda: (x := job(kube, namespace, "lora-chat")) and condition(x, "Failed").get("status") == "False" and x,
    )
    assert "completionTime" not in j["status"]


def test_training_change_after_start_is_rejected_and_reverting_clears_it(
    operator: Any, kubectl: Any, kube: Any, namespace: str
) -> None:
    kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
    rj_name = names.ray_job("lora-chat")
    rj = wait_for("the RayJob", lambda: kube.get(RAYJOB, namespace, rj_name))
    cm = kube.get(CONFIGMAP, namespace, names.config_map("lora-chat"))
    spec_hash = wait_for("specHash", lambda: job(kube, namespace, "lora-chat").get("status", {}).get("specHash"))

    changed = load_example("lora-chat")
    changed["spec"]["training"]["learningRate"] = 0.001
    changed["spec"]["model"]["uri"] = "s3://models/other"
    kubectl.apply(changed, namespace)
    j = wait_cond(kube, namespace, "lora-chat", "SpecChangeRejected", "True", "TrainingFieldsImmutable")
    message = condition(j, "SpecChangeRejected")["message"]
    assert "spec.model.uri" in message and "spec.training.learningRate" in message
    assert j["status"]["observedGeneration"] == 2 and j["status"]["specHash"] == spec_hash
    assert ("Warning", "SpecChangeRejected") in [(t, r) for t, r, _ in events(kubectl, namespace, "lora-chat")]
    # The run is untouched: same RayJob, same spec, same config.
    now = kube.get(RAYJOB, namespace, rj_name)
    assert now["metadata"]["uid"] == rj["metadata"]["uid"] and now["spec"] == rj["spec"]
    assert kube.get(CONFIGMAP, namespace, names.config_map("lora-chat"))["data"] == cm["data"]

    # Writing a default out explicitly is not a change of settings; a live field still applies meanwhile.
    reverted = load_example("lora-chat")
    reverted["spec"]["training"]["seed"] = 42
    reverted["spec"]["backoffLimit"] = 3
    kubectl.apply(reverted, namespace)
    j = wait_cond(kube, namespace, "lora-chat", "SpecChangeRejected", "False", "SpecMatchesRun")
    assert j["status"]["observedGeneration"] == 3
    wait_for("backoffLimit on the RayJob", lambda: kube.get(RAYJOB, namespace, rj_name)["spec"]["backoffLimit"] == 3)
    assert ("Normal", "SpecChangeReverted") in [(t, r) for t, r, _ in events(kubectl, namespace, "lora-chat")]


def test_adopts_what_a_crashed_pass_left_behind(operator: Any, kubectl: Any, kube: Any, namespace: str) -> None:
    """A previous operator died after creating the ConfigMap (from an older spec) but before the RayJob."""
    from kubetune import api
    from kubetune_operator import builders
    from kubetune_operator.meta import Owner
    from kubetune_operator.settings import Settings

    operator.stop()  # nobody reconciles while we stage the crash
    try:
        kubectl.apply(EXAMPLES / "lora-chat.yaml", namespace)
        body = job(kube, namespace, "lora-chat")
        older = load_example("lora-chat")["spec"]
        older["training"]["learningRate"] = 0.1
        stale_cm, sa = builders.training_children(Owner.from_body(body), api.parse_spec(older), Settings(), "x")[:2]
        kube.create(stale_cm)
        kube.create(sa)
    finally:
        operator.start()
    rj = wait_for("the RayJob", lambda: kube.get(RAYJOB, namespace, names.ray_job("lora-chat")))
    cm = kube.get(CONFIGMAP, namespace, names.config_map("lora-chat"))
    assert json.loads(cm["data"]["config.json"])["spec"]["training"]["learningRate"] == 0.0002  # brought up to date
    # The status is written after the RayJob is made: wait for it rather than race it.
    spec_hash = wait_for(
        "status.specHash", lambda: (job(kube, namespace, "lora-chat").get("status") or {}).get("specHash")
    )
    assert rj["metadata"]["annotations"]["kubetune.io/spec-hash"] == spec_hash
    selector = "kubetune.io/job=lora-chat"
    assert len(kubectl.names("configmaps,serviceaccounts,roles,rolebindings,rayjobs", namespace, selector)) == 5
