"""Builders: every object the operator creates for the examples, compared with golden YAML files.

Regenerate after an intended change with `KUBETUNE_UPDATE_GOLDEN=1 pytest tests/operator/test_op_builders.py`
and review the diff of tests/golden/ like code.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import yaml

from kubetune import api
from kubetune_operator import builders, names, policy
from kubetune_operator.builders.config import CONFIG_KEY, applied_spec
from kubetune_operator.meta import LABEL_JOB, Owner
from kubetune_operator.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
EXAMPLES = ("lora-chat", "lora-tuning", "sequence-classification")
OWNER_UID = "00000000-0000-4000-8000-000000000001"


class _GoldenDumper(yaml.SafeDumper):
    """Multi-line strings (the ConfigMap's config.json) as literal blocks, so golden diffs read like JSON."""


def _str(dumper: yaml.SafeDumper, value: str) -> yaml.ScalarNode:
    style = "|" if "\n" in value else None
    return dumper.represent_scalar("tag:yaml.org,2002:str", value, style=style)


_GoldenDumper.add_representer(str, _str)


def _example(name: str) -> tuple[dict, api.FineTuneJobSpec]:
    manifest = yaml.safe_load((ROOT / "examples" / f"{name}.yaml").read_text())
    _, _, spec = api.parse_manifest(manifest)
    return manifest, spec


def _children(name: str) -> list[dict]:
    manifest, spec = _example(name)
    owner = Owner(manifest["metadata"]["name"], "ml-team", OWNER_UID)
    return builders.training_children(owner, spec, Settings(), policy.spec_hash(manifest["spec"]))


@pytest.mark.parametrize("example", sorted(p.stem for p in (ROOT / "examples").glob("*.yaml")))
def test_every_example_parses_and_builds(example: str) -> None:
    """Every top-level example (each is also applied to the API server by test_op_lifecycle) parses and builds."""
    manifest, spec = _example(example)
    children = builders.training_children(
        Owner(manifest["metadata"]["name"], "ns", OWNER_UID), spec, Settings(), policy.spec_hash(manifest["spec"])
    )
    assert [c["kind"] for c in children] == [
        "ConfigMap",
        "ServiceAccount",
        "Role",
        "RoleBinding",
        "NetworkPolicy",
        "RayJob",
    ]


@pytest.mark.parametrize("example", EXAMPLES)
def test_children_match_golden(example: str) -> None:
    rendered = yaml.dump_all(_children(example), Dumper=_GoldenDumper, sort_keys=True, width=120)
    assert list(yaml.safe_load_all(rendered)) == _children(example)  # the golden file is the objects, exactly
    path = GOLDEN / f"{example}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.is_file(), f"{path} missing: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{path} differs: review, then regenerate with KUBETUNE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("example", EXAMPLES)
def test_every_child_is_owned_and_labelled(example: str) -> None:
    for obj in _children(example):
        meta = obj["metadata"]
        assert meta["namespace"] == "ml-team"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": meta["labels"][LABEL_JOB],
                "uid": OWNER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"]["app.kubernetes.io/managed-by"] == "kubetune-operator"
        assert len(meta["name"]) <= 63


def test_config_map_holds_the_resolved_config() -> None:
    cm = _children("lora-chat")[0]
    config = api.TrainerConfig.model_validate(json.loads(cm["data"][CONFIG_KEY]))
    assert config.job.name == "lora-chat" and config.job.namespace == "ml-team" and config.job.uid == OWNER_UID
    assert config.run_uri == f"s3://kubetune-runs/chat/ml-team/lora-chat/{OWNER_UID}"  # one run per incarnation
    assert config.spec.training.lora_settings.r == 16
    # Defaults are filled in, so the trainer never guesses.
    assert json.loads(cm["data"][CONFIG_KEY])["spec"]["training"]["scheduler"] == "cosine"
    assert applied_spec(cm) == _example("lora-chat")[1]


def test_ray_job_runs_the_trainer_with_the_mounted_config() -> None:
    rj = _children("lora-chat")[-1]
    spec = rj["spec"]
    assert spec["entrypoint"] == (
        "python -m kubetune.runlog --config /etc/kubetune/config.json -- "
        "python -m kubetune_trainer --config /etc/kubetune/config.json"
    )
    assert spec["shutdownAfterJobFinishes"] is True
    assert spec["activeDeadlineSeconds"] == 86400 and spec["backoffLimit"] == 1 and spec["suspend"] is False
    head = spec["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    (group,) = spec["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 2
    worker = group["template"]["spec"]
    for pod in (head, worker):
        assert pod["serviceAccountName"] == "lora-chat-trainer"
        (c,) = pod["containers"]
        assert {"name": "kubetune-config", "mountPath": "/etc/kubetune", "readOnly": True} in c["volumeMounts"]
        assert {"name": "KUBETUNE_JOB_NAME", "value": "lora-chat"} in c["env"]
        # Guaranteed QoS (CPU and memory requests = limits); the scratch emptyDir's size is requested only.
        assert {k: v for k, v in c["resources"]["requests"].items() if k != "ephemeral-storage"} == c["resources"][
            "limits"
        ]
        assert c["resources"]["requests"]["ephemeral-storage"] == "100Gi"
        assert {"name": "scratch", "mountPath": "/var/lib/kubetune"} in c["volumeMounts"]
        assert {"name": "dshm", "mountPath": "/dev/shm"} in c["volumeMounts"]
        assert {"name": "KUBETUNE_MODEL_CACHE", "value": "/var/lib/kubetune/models"} in c["env"]
        assert {"name": "TMPDIR", "value": "/var/lib/kubetune/tmp"} in c["env"]
        assert {"name": "scratch", "emptyDir": {"sizeLimit": "100Gi"}} in pod["volumes"]
        assert {"name": "dshm", "emptyDir": {"medium": "Memory"}} in pod["volumes"]
    wres = worker["containers"][0]["resources"]["limits"]
    assert wres == {"cpu": "8", "memory": "32Gi", "nvidia.com/gpu": "1"}
    assert group["rayStartParams"] == {"num-gpus": "1"}
    assert worker["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-A100-SXM4-80GB"}
    assert worker["tolerations"] == head["tolerations"]
    assert rj["metadata"]["annotations"]["kubetune.io/spec-hash"] == policy.spec_hash(_example("lora-chat")[0]["spec"])


def test_credentials_only_by_reference() -> None:
    manifest, _ = _example("lora-chat")
    json.dumps(_children("lora-chat"))  # the children serialise (the result was never asserted on)
    env = _children("lora-chat")[-1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0][
        "env"
    ]
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert refs["AWS_ACCESS_KEY_ID"] == {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
    assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
    assert refs["AWS_SESSION_TOKEN"]["optional"] is True
    assert not any("value" in e for e in env if e["name"].startswith("AWS_"))


def test_hub_token_only_by_reference() -> None:
    """An hf:// base with tokenSecretRef: every Ray pod gets HF_TOKEN by secretKeyRef; the config names the
    Secret, and no pod of a job without it gets the variable."""
    manifest, _ = _example("lora-chat")
    spec_dict = copy.deepcopy(manifest["spec"])
    spec_dict["model"] = {"uri": "hf://org/gated", "revision": "v1", "tokenSecretRef": {"name": "hf", "key": "tok"}}
    spec = api.parse_spec(spec_dict)
    rj = builders.ray_job(Owner("gated", "ml-team", OWNER_UID), spec, Settings(), "h")
    cluster = rj["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]:
        env = template["spec"]["containers"][0]["env"]
        assert [e for e in env if e["name"] == "HF_TOKEN"] == [
            {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf", "key": "tok"}}}
        ]
    plain = _children("lora-chat")[-1]["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
    assert "HF_TOKEN" not in {e["name"] for e in plain["containers"][0]["env"]}


def test_mlflow_credentials_only_by_reference() -> None:
    manifest, _ = _example("lora-chat")
    spec_dict = copy.deepcopy(manifest["spec"])
    spec_dict["tracking"] = {"mlflow": {"uri": "https://mlflow.example", "credentialsSecret": "mlflow-auth"}}
    rj = builders.ray_job(Owner("tracked", "ml-team", OWNER_UID), api.parse_spec(spec_dict), Settings(), "h")
    cluster = rj["spec"]["rayClusterSpec"]
    for template in [cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]]:
        env = template["spec"]["containers"][0]["env"]
        assert {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if e["name"].startswith("MLFLOW_")} == {
            key: {"name": "mlflow-auth", "key": key, "optional": True}
            for key in ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")
        }
    config = json.loads(
        builders.config_map(Owner("tracked", "ml-team", OWNER_UID), api.parse_spec(spec_dict))["data"][CONFIG_KEY]
    )
    assert config["spec"]["tracking"]["mlflow"] == {"uri": "https://mlflow.example", "credentialsSecret": "mlflow-auth"}


def test_queue_label_and_images() -> None:
    manifest, spec = _example("sequence-classification")
    owner = Owner("ticket-classifier", "ml-team", OWNER_UID)
    rj = builders.ray_job(owner, spec, Settings(trainer_image="registry.example/trainer:9.9"), "h")
    assert rj["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "ml-team"
    images = {
        c["image"]
        for g in [rj["spec"]["rayClusterSpec"]["headGroupSpec"], *rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]]
        for c in g["template"]["spec"]["containers"]
    }
    assert images == {"registry.example/trainer:9.9"}
    override = spec.model_copy(
        update={"resources": spec.resources.model_copy(update={"images": api.ImageSpec(trainer="my/trainer:1.0")})}
    )
    rj = builders.ray_job(owner, override, Settings(), "h")
    assert (
        rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]["image"] == "my/trainer:1.0"
    )


def test_tuning_cluster_holds_the_concurrent_trials() -> None:
    """maxConcurrentTrials trials of `workers` pods each run side by side: the worker group has room for all."""
    _, spec = _example("lora-tuning")
    assert spec.tuning is not None and spec.tuning.max_concurrent_trials == 2 and spec.resources.workers == 2
    (group,) = builders.ray_job(Owner("t", "ns", "u"), spec, Settings(), "h")["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ]
    assert group["replicas"] == group["minReplicas"] == group["maxReplicas"] == 4
    fewer_trials = spec.model_copy(update={"tuning": spec.tuning.model_copy(update={"trials": 1})})
    (group,) = builders.ray_job(Owner("t", "ns", "u"), fewer_trials, Settings(), "h")["spec"]["rayClusterSpec"][
        "workerGroupSpecs"
    ]
    assert group["replicas"] == 2  # never more pods than trials can use


def test_scratch_on_a_named_storage_class() -> None:
    _, spec = _example("lora-chat")
    local_nvme = spec.model_copy(
        update={
            "resources": spec.resources.model_copy(
                update={"scratch": api.ScratchSpec(size="500Gi", storage_class_name="local-nvme")}
            )
        }
    )
    rj = builders.ray_job(Owner("t", "ns", "u"), local_nvme, Settings(), "h")
    (group,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    pod = group["template"]["spec"]
    (scratch,) = [v for v in pod["volumes"] if v["name"] == "scratch"]
    assert scratch == {
        "name": "scratch",
        "ephemeral": {
            "volumeClaimTemplate": {
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "local-nvme",
                    "resources": {"requests": {"storage": "500Gi"}},
                }
            }
        },
    }
    assert "ephemeral-storage" not in pod["containers"][0]["resources"]["requests"]  # the claim holds it


def test_cpu_only_workers_request_no_gpu() -> None:
    _, spec = _example("sequence-classification")
    cpu = spec.model_copy(update={"resources": spec.resources.model_copy(update={"gpus_per_worker": 0})})
    rj = builders.ray_job(Owner("t", "ns", "u"), cpu, Settings(), "h")
    (group,) = rj["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["rayStartParams"] == {}
    assert set(group["template"]["spec"]["containers"][0]["resources"]["limits"]) == {"cpu", "memory"}
    assert "activeDeadlineSeconds" not in rj["spec"]


def test_trainer_role_reaches_only_its_own_job() -> None:
    role = builders.role(Owner("job-a", "ns", "u"))
    assert role["rules"] == [
        {"apiGroups": ["kubetune.io"], "resources": ["finetunejobs"], "resourceNames": ["job-a"], "verbs": ["get"]},
        {
            "apiGroups": ["kubetune.io"],
            "resources": ["finetunejobs/status"],
            "resourceNames": ["job-a"],
            "verbs": ["get", "patch"],
        },
    ]
    binding = builders.role_binding(Owner("job-a", "ns", "u"))
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "job-a-trainer", "namespace": "ns"}]
    assert binding["roleRef"]["name"] == role["metadata"]["name"]


def test_long_names_are_trimmed_with_a_hash() -> None:
    long = "a" * 63
    _, spec = _example("lora-chat")
    for obj in builders.training_children(Owner(long, "ns", "u"), spec, Settings(), "h"):
        assert len(obj["metadata"]["name"]) <= (47 if obj["kind"] == "RayJob" else 63)
    assert names.ray_job(long) != names.ray_job(long[:-1] + "b")
