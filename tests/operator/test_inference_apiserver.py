"""Serving against the real API server, with the operator in-process: the test plays KubeRay (the RayJob
succeeds, kubetune_cli.localenv.kuberay), the trainer (status.model, status.evaluation through the status
subresource) and the Deployment controller with its kubelets (Deployment status, kubetune_cli.localenv.kubelet).

It sees the Deployment and Service appear once training succeeded (accepted by the API server with nothing
pruned), `Deployed` follow the Deployment's availability, `status.endpoint`, every `spec.deploy` change
reconciled without touching the training run (replicas, served name, resources, scale to zero, disable and
re-enable), a deleted Deployment put back, the deployment gate (AwaitingEvaluation -> NotImproved -> deployed
after a live threshold change), and everything gone with the job (garbage collector).
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from op_support import condition, events, first_difference, get_columns, load_example, put_s3_secret, wait_for

from kubetune import api
from kubetune_cli.localenv.kubelet import DeploymentController
from kubetune_operator import names
from kubetune_operator.builders import inference
from kubetune_operator.kube import DEPLOYMENT, FINETUNEJOB, RAYJOB, SERVICE
from kubetune_operator.meta import Owner

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

SECRET_VALUE = "kubetune-secret-value-do-not-leak"
WAIT = 45  # seconds; every wait has a deadline (2 shared cores: generous, never a bare sleep)


@pytest.fixture(scope="module")
def deployments(kubeconfig: Any) -> Iterator[DeploymentController]:
    with DeploymentController(kubeconfig) as dc:
        yield dc


@pytest.fixture
def s3_secret(kube: Any, namespace: str) -> str:
    put_s3_secret(kube, namespace, "AKIAKUBETUNETEST0002", SECRET_VALUE)
    return SECRET_VALUE


def _manifest(name: str, **deploy: Any) -> dict[str, Any]:
    m = load_example("lora-chat")
    m["metadata"]["name"] = name
    m["spec"]["deploy"] = {
        "enabled": True,
        "replicas": 1,
        "servedModelName": "chat-assistant",
        "resources": {"gpus": 1, "cpu": "2", "memory": "8Gi"},
        **deploy,
    }
    return m


def _ftj(kube: Any, ns: str, name: str) -> dict[str, Any]:
    return kube.get(FINETUNEJOB, ns, name) or {}


def _deployed(kube: Any, ns: str, name: str, status: str, reason: str, timeout: float = WAIT) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        job = _ftj(kube, ns, name)
        c = condition(job, "Deployed")
        return job if (c.get("status"), c.get("reason")) == (status, reason) else None

    try:
        return wait_for(f"{name}: Deployed={status} ({reason})", ok, timeout=timeout)
    except AssertionError as e:
        raise AssertionError(
            f"{e}\nconditions now: {_ftj(kube, ns, name).get('status', {}).get('conditions')}"
        ) from None


def _serving(kube: Any, ns: str, job: str) -> tuple[dict | None, dict | None]:
    name = names.inference(job)
    return kube.get(DEPLOYMENT, ns, name), kube.get(SERVICE, ns, name)


def _gone(kube: Any, ns: str, job: str) -> bool:
    return _serving(kube, ns, job) == (None, None)


def _patch_spec(kube: Any, ns: str, name: str, deploy: dict[str, Any]) -> None:
    kube.patch(FINETUNEJOB, ns, name, {"spec": {"deploy": deploy}})


def _train(
    kube: Any, kuberay: Any, ns: str, name: str, *, model: dict | None = None, evaluation: dict | None = None
) -> str:
    """KubeRay runs the job; the trainer reports its artifact (and evaluation); KubeRay completes it."""
    rj = wait_for(f"RayJob of {name}", lambda: kube.get(RAYJOB, ns, names.ray_job(name)), timeout=WAIT)
    rj_name = rj["metadata"]["name"]
    kuberay.start(ns, rj_name)
    report = {"model": model} if model else {}
    if evaluation:
        report["evaluation"] = evaluation
    if report:
        kube.patch_status(FINETUNEJOB, ns, name, report)
    kuberay.succeed(ns, rj_name)
    return rj_name


def test_serving_follows_training_and_spec_deploy(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    deployments: DeploymentController,
    namespace: str,
    s3_secret: str,
) -> None:
    ns, job = namespace, "chat"
    kubectl.apply(_manifest(job), ns)
    run_uri = f"s3://kubetune-runs/chat/{ns}/{job}"
    model = {"uri": f"{run_uri}/model", "baseUri": "s3://models/smollm2-135m-instruct", "kind": "adapter"}
    rj_name = _train(kube, kuberay, ns, job, model=model)
    ray_uid = kube.get(RAYJOB, ns, rj_name)["metadata"]["uid"]

    # Training succeeded: the Deployment and Service exist, the rollout has not made a replica available yet.
    body = _deployed(kube, ns, job, "False", "Progressing")
    status = body["status"]
    assert status["state"] == "Deploying"
    assert status["endpoint"] == {"url": f"http://chat-inference.{ns}.svc:8000/v1", "model": "chat-assistant"}
    assert status["model"] == model, "the operator's status write touched the trainer's report"
    dep, svc = _serving(kube, ns, job)
    assert dep is not None and svc is not None

    # Exactly what the builders make, accepted by the API server with nothing pruned.
    spec = api.parse_spec(body["spec"])
    owner = Owner.from_body(body)
    expected_svc, expected_dep = inference.serving_children(
        owner, spec, operator.settings, inference.serving_plan(owner, spec, model)
    )
    assert first_difference(expected_dep, dep) is None, first_difference(expected_dep, dep)
    assert first_difference(expected_svc, svc) is None, first_difference(expected_svc, svc)
    assert dep["metadata"]["ownerReferences"][0]["uid"] == owner.uid
    pod = dep["spec"]["template"]["spec"]
    assert [i["command"][3] for i in pod["initContainers"]] == [model["baseUri"], model["uri"]]
    assert SECRET_VALUE not in json.dumps([dep, svc, body])

    # The kubelets report the pod ready: Deployed, with the endpoint; `kubectl get ftj` shows it.
    deployments.available(ns, dep["metadata"]["name"])
    body = _deployed(kube, ns, job, "True", "Available")
    assert body["status"]["state"] == "Deployed"
    assert "serving chat-assistant at http://chat-inference." in condition(body, "Deployed")["message"]
    cols = get_columns(kubectl, ns, job)
    assert cols["STATUS"] == "Deployed" and cols["ENDPOINT"].startswith("http://chat-inference.")
    reasons = [e[1] for e in events(kubectl, ns, job)]
    assert reasons[-2:] == ["Progressing", "Deployed"] and reasons.count("Deployed") == 1
    assert reasons.count("ServingCreated") == 1 and reasons.index("ServingCreated") > reasons.index("Running")

    # spec.deploy is live: replicas.
    _patch_spec(kube, ns, job, {"replicas": 2})
    dep = wait_for(
        "Deployment scaled to 2",
        lambda: (d := _serving(kube, ns, job)[0]) and d["spec"]["replicas"] == 2 and d,
        timeout=WAIT,
    )
    deployments.available(ns, dep["metadata"]["name"])
    wait_for(
        "2/2 available in Deployed's message",
        lambda: condition(_ftj(kube, ns, job), "Deployed").get("message", "").startswith("2/2"),
        timeout=WAIT,
    )

    # The served name and resources: the Deployment's spec is replaced (the GPU limit goes), the endpoint follows.
    _patch_spec(kube, ns, job, {"servedModelName": "chat-v2", "resources": {"gpus": 0, "cpu": "2", "memory": "8Gi"}})
    dep = wait_for(
        "Deployment on CPU serving chat-v2",
        lambda: (
            (d := _serving(kube, ns, job)[0])
            and "chat-v2=/models/model" in d["spec"]["template"]["spec"]["containers"][0]["args"]
            and d
        ),
        timeout=WAIT,
    )
    server = dep["spec"]["template"]["spec"]["containers"][0]
    assert server["resources"]["limits"] == {"cpu": "2", "memory": "8Gi"}
    assert {"name": "VLLM_TARGET_DEVICE", "value": "cpu"} in server["env"]
    assert dep["spec"]["replicas"] == 2
    wait_for(
        "endpoint model chat-v2",
        lambda: (_ftj(kube, ns, job)["status"].get("endpoint") or {}).get("model") == "chat-v2",
        timeout=WAIT,
    )
    deployments.available(ns, dep["metadata"]["name"])
    _deployed(kube, ns, job, "True", "Available")

    # Someone deletes the Deployment: it is put back.
    old_uid = dep["metadata"]["uid"]
    kube.delete(DEPLOYMENT, ns, dep["metadata"]["name"])
    dep = wait_for(
        "the Deployment recreated",
        lambda: (d := _serving(kube, ns, job)[0]) and d["metadata"]["uid"] != old_uid and d,
        timeout=WAIT,
    )
    deployments.available(ns, dep["metadata"]["name"])
    _deployed(kube, ns, job, "True", "Available")

    # Scale to zero: the objects stay, nothing serves, the job is Succeeded again.
    _patch_spec(kube, ns, job, {"replicas": 0})
    wait_for("Deployment at 0", lambda: _serving(kube, ns, job)[0]["spec"]["replicas"] == 0, timeout=WAIT)
    deployments.available(ns, dep["metadata"]["name"])
    body = _deployed(kube, ns, job, "False", "ScaledToZero")
    assert body["status"]["state"] == "Succeeded" and body["status"]["endpoint"]["model"] == "chat-v2"

    # Disabled: Deployment and Service removed, endpoint gone; enabled again: back.
    _patch_spec(kube, ns, job, {"enabled": False, "replicas": 1})
    body = _deployed(kube, ns, job, "False", "Disabled")
    wait_for("serving objects removed", lambda: _gone(kube, ns, job), timeout=WAIT)
    body = wait_for(
        "endpoint removed", lambda: "endpoint" not in (j := _ftj(kube, ns, job))["status"] and j, timeout=WAIT
    )
    assert body["status"]["state"] == "Succeeded"
    _patch_spec(kube, ns, job, {"enabled": True})
    _deployed(kube, ns, job, "False", "Progressing")
    dep = wait_for(
        "serving objects back", lambda: all(_serving(kube, ns, job)) and _serving(kube, ns, job)[0], timeout=WAIT
    )
    deployments.available(ns, dep["metadata"]["name"])
    body = _deployed(kube, ns, job, "True", "Available")
    assert body["status"]["endpoint"]["model"] == "chat-v2"

    reasons = [e[1] for e in events(kubectl, ns, job)]
    assert {"ServingUpdated", "ServingRemoved", "ScaledToZero", "Disabled"} <= set(reasons)
    assert reasons.count("ServingCreated") == 3  # first deploy, the deleted Deployment, re-enabled

    # None of it retrained: the same RayJob, still complete, and no second one.
    ray = kube.get(RAYJOB, ns, rj_name)
    assert ray["metadata"]["uid"] == ray_uid and ray["status"]["jobDeploymentStatus"] == "Complete"
    assert kubectl.names("rayjobs.ray.io", ns) == [f"rayjob.ray.io/{rj_name}"]
    assert condition(body, "Succeeded")["status"] == "True"

    # Deleting the job removes everything it made (owner references + the garbage collector).
    kube.delete(FINETUNEJOB, ns, job)
    wait_for("serving objects garbage-collected", lambda: _gone(kube, ns, job), timeout=90)


def test_deployment_gate(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    deployments: DeploymentController,
    namespace: str,
    s3_secret: str,
) -> None:
    ns, job = namespace, "gated"
    kubectl.apply(_manifest(job, minImprovement=0.1), ns)
    _train(
        kube,
        kuberay,
        ns,
        job,
        model={
            "uri": f"s3://kubetune-runs/chat/{ns}/{job}/model",
            "kind": "adapter",
            "baseUri": "s3://models/smollm2-135m-instruct",
        },
    )

    # Training succeeded but the trainer has not reported its evaluation: wait, serve nothing.
    body = _deployed(kube, ns, job, "False", "AwaitingEvaluation")
    assert body["status"]["state"] == "Deploying" and "endpoint" not in body["status"]
    assert _gone(kube, ns, job)

    # The evaluation arrives (after the run): not good enough.
    kube.patch_status(
        FINETUNEJOB,
        ns,
        job,
        {"evaluation": {"metric": "evalLoss", "base": 4.52, "fineTuned": 4.47, "improvement": 0.05}},
    )
    body = _deployed(kube, ns, job, "False", "NotImproved")
    message = condition(body, "Deployed")["message"]
    assert "base 4.52" in message and "fine-tuned 4.47" in message and "minImprovement 0.1" in message
    assert body["status"]["state"] == "Succeeded" and _gone(kube, ns, job)
    assert ("Normal", "NotImproved", message) in events(kubectl, ns, job)

    # The gate is a deploy field, live: a lower threshold deploys the same model, no retraining.
    _patch_spec(kube, ns, job, {"minImprovement": 0.05})
    _deployed(kube, ns, job, "False", "Progressing")
    dep = wait_for("serving objects", lambda: _serving(kube, ns, job)[0], timeout=WAIT)
    deployments.available(ns, dep["metadata"]["name"])
    _deployed(kube, ns, job, "True", "Available")

    # Raised again: taken down.
    _patch_spec(kube, ns, job, {"minImprovement": 0.5})
    _deployed(kube, ns, job, "False", "NotImproved")
    wait_for("serving objects removed", lambda: _gone(kube, ns, job), timeout=WAIT)


def test_disabled_job_never_gets_a_deployed_condition(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    namespace: str,
    s3_secret: str,
) -> None:
    ns, job = namespace, "no-serving"
    kubectl.apply(_manifest(job, enabled=False), ns)
    _train(kube, kuberay, ns, job)
    body = wait_for(
        "Succeeded",
        lambda: (j := _ftj(kube, ns, job)).get("status", {}).get("state") == "Succeeded" and j,
        timeout=WAIT,
    )
    assert condition(body, "Deployed") == {} and "endpoint" not in body["status"]
    assert _gone(kube, ns, job)
