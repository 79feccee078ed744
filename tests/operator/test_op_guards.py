"""Hostile or unlucky specs, without a cluster: Kueue's suspend, images, Secrets, overlapping outputs, the
Ray head's locks (token auth, NetworkPolicy, securityContext), peering priorities and ownership checks."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import yaml

from kubetune import api
from kubetune_operator import builders, guards, names, policy
from kubetune_operator import conditions as c
from kubetune_operator.builders.rayjob import ANNOTATION_APPLIED_SUSPEND, live_patch
from kubetune_operator.kube import NotOwned, check_owned
from kubetune_operator.meta import Owner
from kubetune_operator.settings import Settings, default_priority
from kubetune_operator.status import phase_of

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
OWNER = Owner("lora-chat", "ns", "00000000-0000-4000-8000-000000000001")


def _spec(**changes: object) -> api.FineTuneJobSpec:
    raw = yaml.safe_load((ROOT / "examples" / "lora-chat.yaml").read_text())["spec"]
    raw.update(changes)
    return api.parse_spec(raw)


def _ray(spec: api.FineTuneJobSpec) -> dict:
    return builders.ray_job(OWNER, spec, Settings(), "h")


def test_suspend_passes_on_only_the_users_changes() -> None:
    ray = _ray(_spec(suspend=True))
    assert ray["metadata"]["annotations"][ANNOTATION_APPLIED_SUSPEND] == "true"
    assert live_patch(ray, _spec(suspend=True)) == {}
    kueue_admitted = copy.deepcopy(ray)
    kueue_admitted["spec"]["suspend"] = False  # Kueue unsuspended it: a full pass must leave that alone
    assert live_patch(kueue_admitted, _spec(suspend=True)) == {}
    # The user unsuspends while Kueue holds it suspended: passed on (it is the user's change)...
    patch = live_patch(ray, _spec(suspend=False))
    assert patch == {"spec": {"suspend": False}, "metadata": {"annotations": {ANNOTATION_APPLIED_SUSPEND: "false"}}}
    # ...and once recorded, Kueue suspending it again is not undone.
    applied = copy.deepcopy(ray)
    applied["metadata"]["annotations"][ANNOTATION_APPLIED_SUSPEND] = "false"
    applied["spec"]["suspend"] = True
    assert live_patch(applied, _spec(suspend=False)) == {}


def test_a_rayjob_without_the_annotation_keeps_its_suspend() -> None:
    ray = _ray(_spec(suspend=False))
    del ray["metadata"]["annotations"][ANNOTATION_APPLIED_SUSPEND]
    ray["spec"]["suspend"] = True  # an older operator's RayJob that Kueue suspended
    assert live_patch(ray, _spec(suspend=False)) == {"metadata": {"annotations": {ANNOTATION_APPLIED_SUSPEND: "false"}}}


def test_other_live_fields_still_follow() -> None:
    ray = _ray(_spec())
    assert live_patch(ray, _spec(backoffLimit=3)) == {"spec": {"backoffLimit": 3}}


@pytest.mark.parametrize(
    "image, allowed",
    [
        ("ghcr.io/kubetune/kubetune-trainer:1", True),
        ("ghcr.io/other/x:1", True),
        ("registry.example.com/ml/trainer:2", False),
        ("ubuntu:22.04", False),
        ("ghcr.io.evil.com/x:1", False),
    ],
)
def test_image_registries(image: str, allowed: bool) -> None:
    assert guards.image_allowed(image, ("ghcr.io",)) is allowed


def test_images_outside_the_allowed_registries_are_invalid_naming_the_field() -> None:
    spec = _spec(resources={"workers": 1, "images": {"trainer": "evil.example.com/miner:1"}})
    errors = guards.image_errors(spec, Settings(allowed_image_registries=("ghcr.io/kubetune",)))
    assert [p for p, _ in errors] == ["spec.resources.images.trainer"] and "evil.example.com" in errors[0][1]
    assert guards.image_errors(spec, Settings()) == []  # no list: any registry


def test_webhook_refuses_images_outside_the_allowed_registries() -> None:
    from kubetune_operator.webhook import admission_errors

    body = yaml.safe_load((ROOT / "examples" / "lora-chat.yaml").read_text())
    body["spec"].setdefault("resources", {})["images"] = {"inference": "docker.io/x/vllm:1"}
    errors = admission_errors("CREATE", body, None, Settings(allowed_image_registries=("ghcr.io",)))
    assert [p for p, _ in errors] == ["spec.resources.images.inference"]


def test_missing_secret_and_key_are_named() -> None:
    reason, message = guards.secret_problem("s3", "ns", None)
    assert reason == c.SECRET_NOT_FOUND and "ns/s3" in message
    reason, message = guards.secret_problem("s3", "ns", {"data": {"AWS_ACCESS_KEY_ID": ""}})
    assert reason == c.SECRET_KEY_MISSING and "ns/s3" in message and "AWS_SECRET_ACCESS_KEY" in message
    assert guards.secret_problem("s3", "ns", {"data": {k: "" for k in guards.REQUIRED_KEYS}}) is None


def test_an_hf_token_secret_is_checked_like_the_credentials() -> None:
    spec = api.parse_spec(
        {
            "model": {"uri": "hf://org/gated", "tokenSecretRef": {"name": "hf", "key": "token"}},
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "completion", "credentialsSecret": "s3"},
            "output": {"uri": "s3://bucket/out"},
        }
    )
    assert guards.secrets_to_check(spec) == [
        ("spec.dataset.credentialsSecret", "s3", guards.REQUIRED_KEYS),
        ("spec.model.tokenSecretRef", "hf", ("token",)),
    ]
    reason, message = guards.secret_problem("hf", "ns", None, "spec.model.tokenSecretRef", ("token",))
    assert reason == c.SECRET_NOT_FOUND
    assert message == "Secret ns/hf (spec.model.tokenSecretRef) does not exist; create it with key token"
    reason, message = guards.secret_problem(
        "hf", "ns", {"data": {"HF_TOKEN": ""}}, "spec.model.tokenSecretRef", ("token",)
    )
    assert reason == c.SECRET_KEY_MISSING and message == "Secret ns/hf (spec.model.tokenSecretRef) has no key token"
    assert guards.secret_problem("hf", "ns", {"data": {"token": "x"}}, "spec.model.tokenSecretRef", ("token",)) is None


def test_an_mlflow_credentials_secret_must_exist() -> None:
    spec = api.parse_spec(
        {
            "model": {"uri": "s3://bucket/base"},
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "completion"},
            "output": {"uri": "s3://bucket/out"},
            "tracking": {"mlflow": {"uri": "https://mlflow.example", "credentialsSecret": "mlflow-auth"}},
        }
    )
    field = "spec.tracking.mlflow.credentialsSecret"
    assert guards.secrets_to_check(spec) == [(field, "mlflow-auth", ())]
    reason, message = guards.secret_problem("mlflow-auth", "ns", None, field, ())
    assert (reason, message) == (c.SECRET_NOT_FOUND, f"Secret ns/mlflow-auth ({field}) does not exist")
    assert guards.secret_problem("mlflow-auth", "ns", {"data": {"MLFLOW_TRACKING_TOKEN": "x"}}, field, ()) is None


def _job(name: str, uri: str, created: str, *, namespace: str = "ns", done: bool = False) -> dict:
    status = {"conditions": [{"type": "Succeeded", "status": "True"}]} if done else {}
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": {"output": {"uri": uri}},
        "status": status,
    }


def test_overlapping_outputs_refuse_the_younger_job() -> None:
    old = _job("a", "s3://b/out", "2026-01-01T00:00:00Z")
    nested = _job("x", "s3://b/out/ns/a", "2026-01-02T00:00:00Z")  # writes inside a's prefix
    assert guards.overlapping_job(nested["metadata"], "s3://b/out/ns/a", [old, nested]) == "ns/a"
    assert guards.overlapping_job(old["metadata"], "s3://b/out", [old, nested]) is None  # the older one runs on
    same_uri = _job("b", "s3://b/out", "2026-01-03T00:00:00Z")  # a sibling prefix: <out>/ns/b
    assert guards.overlapping_job(same_uri["metadata"], "s3://b/out", [old, same_uri]) is None
    finished = _job("a", "s3://b/out", "2026-01-01T00:00:00Z", done=True)
    assert guards.overlapping_job(nested["metadata"], "s3://b/out/ns/a", [finished]) is None


def test_ray_head_is_locked() -> None:
    children = builders.training_children(OWNER, _spec(), Settings(kuberay_namespace="ray-system"), "h")
    ray = children[-1]
    assert ray["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token"}
    groups = [ray["spec"]["rayClusterSpec"]["headGroupSpec"], *ray["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
    for group in groups:
        pod = group["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
        for container in pod["containers"]:
            assert container["securityContext"] == {
                "allowPrivilegeEscalation": False,
                "capabilities": {"drop": ["ALL"]},
            }
    (netpol,) = [o for o in children if o["kind"] == "NetworkPolicy"]
    assert netpol["metadata"]["name"] == names.network_policy(OWNER.name)
    assert netpol["spec"]["podSelector"]["matchLabels"] == {"kubetune.io/job": "lora-chat", "ray.io/node-type": "head"}
    own, operators = netpol["spec"]["ingress"]
    assert {"podSelector": {"matchLabels": {"job-name": names.ray_job(OWNER.name)}}} in own["from"]
    assert "ports" not in own  # the job's own workers use the raylet's ports too
    assert sorted(p["port"] for p in operators["ports"]) == [6379, 8265, 10001]
    assert operators["from"][0]["namespaceSelector"] == {"matchLabels": {"kubernetes.io/metadata.name": "ray-system"}}


def test_inference_pods_are_locked_too() -> None:
    from kubetune_operator.builders import inference

    sc = inference.container_security(read_only_root=False)
    assert sc["allowPrivilegeEscalation"] is False and sc["capabilities"] == {"drop": ["ALL"]}


def test_peering_priorities_differ_between_replicas() -> None:
    pods = [f"kubetune-operator-7d9f8c-{s}" for s in ("abcde", "fghij", "klmno", "pqrst")]
    priorities = {default_priority(p) for p in pods}
    assert len(priorities) == len(pods) and all(p > 0 for p in priorities)
    assert Settings.from_env({"KUBETUNE_PEERING_PRIORITY": "7"}).peering_priority == 7


def test_ownership_is_checked_on_conflicts() -> None:
    ours = builders.config_map(OWNER, _spec())
    check_owned(copy.deepcopy(ours), ours)  # same controller: fine
    foreign = copy.deepcopy(ours)
    foreign["metadata"]["ownerReferences"] = []
    with pytest.raises(NotOwned, match="has no controller"):
        check_owned(foreign, ours)
    other = copy.deepcopy(ours)
    other["metadata"]["ownerReferences"][0]["uid"] = "someone-else"
    with pytest.raises(NotOwned, match="controlled by FineTuneJob lora-chat"):
        check_owned(other, ours)


def test_s3_access_denied_has_a_reason_of_its_own() -> None:
    ray = {
        "metadata": {"name": "r"},
        "status": {
            "jobDeploymentStatus": "Complete",
            "jobStatus": "FAILED",
            "message": "Job entrypoint command failed with exit code 1, last available logs: ...\n"
            "kubetune-trainer: error: S3AccessDenied: endpoint http://s3:8333 refused the keys "
            "for bucket runs (InvalidAccessKeyId)",
        },
    }
    assert phase_of(ray).reason == c.S3_ACCESS_DENIED
    ray["status"]["message"] = "kubetune-trainer: error: training: RuntimeError: boom"
    assert phase_of(ray).reason == c.APP_FAILED


def test_spec_hash_ignores_live_fields() -> None:
    assert policy.spec_hash({"suspend": True, "output": {"uri": "s3://a"}}) == policy.spec_hash(
        {"suspend": False, "output": {"uri": "s3://a"}}
    )


def test_the_webhook_runs_on_the_event_loop_not_in_the_reconcile_threads() -> None:
    """kopf runs synchronous handlers in the thread pool the reconcile handlers block in; a coroutine it awaits
    on its event loop at once, so an admission review never queues behind a burst of reconciles."""
    import asyncio

    from kubetune_operator import webhook

    assert asyncio.iscoroutinefunction(webhook.validate_job)


def test_local_ray_cluster_takes_kuberays_token_auth(tmp_path: Path) -> None:
    from kubetune_cli.localenv.raycluster import LocalRayCluster

    plain = LocalRayCluster(tmp_path / "ray.log", num_cpus=1, env={})
    assert plain.env["RAY_AUTH_MODE"] == "disabled"
    locked = LocalRayCluster(tmp_path / "ray.log", num_cpus=1, env={}, auth_token="t0ken")
    assert (locked.env["RAY_AUTH_MODE"], locked.env["RAY_AUTH_TOKEN"]) == ("token", "t0ken")
    locked.address = "127.0.0.1:1"
    assert locked.driver_env()["RAY_AUTH_TOKEN"] == "t0ken" and locked.driver_env()["RAY_AUTH_MODE"] == "token"
