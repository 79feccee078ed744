"""Inference builders: the vLLM Deployment and its Service for each way a model is served, compared with golden
YAML files, plus the properties every case must have (credentials by reference only, probes on /health,
owner references and labels, the vLLM command line from kubetune.vllm).

Regenerate after an intended change with `KUBETUNE_UPDATE_GOLDEN=1 pytest tests/operator/test_inference_builders.py`
and review the diff of tests/golden/inference-*.yaml like code.
"""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api
from kubetune.vllm import VLLM_COMMAND, lora_rank_bucket
from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.builders import inference
from kubetune_operator.meta import LABEL_JOB, Owner
from kubetune_operator.settings import Settings

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOLDEN = ROOT / "tests" / "golden"
OWNER_UID = "00000000-0000-4000-8000-000000000001"
RUN = f"s3://kubetune-runs/chat/ml-team/lora-chat/{OWNER_UID}"  # <output>/<namespace>/<name>/<uid>


def _manifest() -> dict[str, Any]:
    return yaml.safe_load((ROOT / "examples" / "lora-chat.yaml").read_text())


def _spec(change: Any = None) -> api.FineTuneJobSpec:
    m = _manifest()
    if change is not None:
        change(m["spec"])
    return api.parse_manifest(m)[2]


def _merged(s: dict) -> None:
    s["output"]["exportMerged"] = True
    s["deploy"].update(
        mode="merged", replicas=2, maxModelLen=4096, resources={"gpus": 2, "cpu": "16", "memory": "64Gi"}
    )


def _full_cpu(s: dict) -> None:
    s["training"] = {"method": "full", "epochs": 1}
    s["deploy"] = {"servedModelName": "chat-full", "resources": {"gpus": 0, "cpu": "4", "memory": "12Gi"}}


def _adapter_cpu_layout(s: dict) -> None:
    s["deploy"]["resources"] = {"gpus": 0, "cpu": "2", "memory": "6Gi"}
    del s["deploy"]["servedModelName"]


def _adapter_hub_base(s: dict) -> None:
    s["model"] = {
        "uri": "hf://HuggingFaceTB/SmolLM2-135M-Instruct",
        "revision": "main",
        "tokenSecretRef": {"name": "hf-token"},
    }
    s["training"]["lora"]["r"] = 12


TRAINER_ADAPTER = {"uri": f"{RUN}/model", "baseUri": "s3://models/smollm2-135m-instruct", "kind": "adapter"}
TRAINER_MERGED = {**TRAINER_ADAPTER, "mergedUri": f"{RUN}/merged"}
TRAINER_FULL = {"uri": f"{RUN}/model", "kind": "full"}

# case -> (spec change, status.model as the trainer reported it, or None for the deterministic layout)
CASES: dict[str, tuple[Any, dict | None]] = {
    "adapter-gpu": (None, TRAINER_ADAPTER),
    "merged-gpu": (_merged, TRAINER_MERGED),
    "full-cpu": (_full_cpu, TRAINER_FULL),
    "adapter-cpu": (_adapter_cpu_layout, None),
    "adapter-hub-base": (_adapter_hub_base, None),
}


class _GoldenDumper(yaml.SafeDumper):
    pass


def _objects(case: str) -> list[dict]:
    change, model = CASES[case]
    spec = _spec(change)
    owner = Owner("lora-chat", "ml-team", OWNER_UID)
    plan = inference.serving_plan(owner, spec, copy.deepcopy(model))
    return inference.serving_children(owner, spec, Settings(), plan)


def _container(objs: list[dict], name: str = "vllm") -> dict:
    pod = objs[1]["spec"]["template"]["spec"]
    return next(x for x in pod["containers"] + pod["initContainers"] if x["name"] == name)


@pytest.mark.parametrize("case", sorted(CASES))
def test_objects_match_golden(case: str) -> None:
    objs = _objects(case)
    rendered = yaml.dump_all(objs, Dumper=_GoldenDumper, sort_keys=True, width=120)
    assert list(yaml.safe_load_all(rendered)) == objs
    path = GOLDEN / f"inference-{case}.yaml"
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1":
        path.write_text(rendered)
    assert path.is_file(), f"{path} missing: run with KUBETUNE_UPDATE_GOLDEN=1"
    assert rendered == path.read_text(), f"{path} differs: review, then regenerate with KUBETUNE_UPDATE_GOLDEN=1"


@pytest.mark.parametrize("case", sorted(CASES))
def test_every_case_is_owned_labelled_probed_and_keyless(case: str) -> None:
    svc, dep = _objects(case)
    for obj in (svc, dep):
        meta = obj["metadata"]
        assert meta["name"] == names.inference("lora-chat") == "lora-chat-inference"
        assert meta["ownerReferences"] == [
            {
                "apiVersion": api.API_VERSION,
                "kind": api.KIND,
                "name": "lora-chat",
                "uid": OWNER_UID,
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ]
        assert meta["labels"][LABEL_JOB] == "lora-chat"
        assert meta["labels"]["app.kubernetes.io/component"] == "inference"
        assert meta["annotations"][inference.ANNOTATION_SERVING_HASH] == inference.serving_hash(obj)
    # The Service selects exactly the Deployment's pods (not the job's training pods, which share kubetune.io/job).
    template_labels = dep["spec"]["template"]["metadata"]["labels"]
    assert svc["spec"]["selector"] == dep["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["selector"].items() <= template_labels.items()
    assert svc["spec"]["ports"] == [{"name": "http", "port": 8000, "targetPort": "http", "protocol": "TCP"}]
    server = _container([svc, dep])
    assert server["command"] == list(VLLM_COMMAND)
    assert server["ports"] == [{"name": "http", "containerPort": 8000, "protocol": "TCP"}]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert server[probe]["httpGet"] == {"path": "/health", "port": "http"}
    assert server["resources"]["requests"] == server["resources"]["limits"]
    pod = dep["spec"]["template"]["spec"]
    assert pod["securityContext"]["runAsNonRoot"] is True and pod["automountServiceAccountToken"] is False
    assert pod["enableServiceLinks"] is False  # a Service named vllm would set VLLM_PORT in the container
    # Credentials only by reference, in the fetchers only; the server never sees them.
    rendered = json.dumps(dep)
    assert "AKIA" not in rendered and "secret-value" not in rendered
    for init in pod["initContainers"]:
        assert init["command"][:3] == [VLLM_COMMAND[0], "-m", "kubetune.fetch"]
        refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in init["env"] if "valueFrom" in e}
        assert refs["AWS_ACCESS_KEY_ID"] == {"name": "s3-credentials", "key": "AWS_ACCESS_KEY_ID"}
        assert refs["AWS_SECRET_ACCESS_KEY"] == {"name": "s3-credentials", "key": "AWS_SECRET_ACCESS_KEY"}
        assert all("value" not in e for e in init["env"] if e["name"].startswith("AWS_"))
        assert init["command"][-4:] == ["--endpoint-url", "http://seaweedfs.storage.svc:8333", "--region", "us-east-1"]
    assert not any(e["name"].startswith("AWS_") for e in server["env"])
    # 0.0.0.0 only inside the pod's own network namespace, never anywhere else in what is built.
    assert server["args"][server["args"].index("--host") + 1] == "0.0.0.0"
    assert rendered.count("0.0.0.0") == 1


def test_adapter_is_served_on_its_base_under_the_served_name() -> None:
    svc, dep = _objects("adapter-gpu")
    pod = dep["spec"]["template"]["spec"]
    assert [i["name"] for i in pod["initContainers"]] == ["fetch-base", "fetch-model"]
    base, model = pod["initContainers"]
    assert base["command"][3:5] == ["s3://models/smollm2-135m-instruct", "/models/base"]
    assert model["command"][3:5] == [f"{RUN}/model", "/models/model"]
    args = _container([svc, dep])["args"]
    assert args[:2] == ["--model", "/models/base"]
    assert args[args.index("--served-model-name") + 1] == "chat-assistant-base"
    assert args[args.index("--lora-modules") + 1] == "chat-assistant=/models/model"
    assert args[args.index("--max-lora-rank") + 1] == str(lora_rank_bucket(16))
    assert "--enable-lora" in args and args[args.index("--dtype") + 1] == "bfloat16"
    assert _container([svc, dep])["resources"]["limits"]["nvidia.com/gpu"] == "1"
    assert pod["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    assert "nodeSelector" not in pod  # the training GPU class is not imposed on serving
    assert inference.endpoint(Owner("lora-chat", "ml-team", OWNER_UID), _spec()) == {
        "url": "http://lora-chat-inference.ml-team.svc:8000/v1",
        "model": "chat-assistant",
    }


def test_merged_serves_plain_weights_with_tensor_parallelism() -> None:
    svc, dep = _objects("merged-gpu")
    pod = dep["spec"]["template"]["spec"]
    assert [i["command"][3] for i in pod["initContainers"]] == [f"{RUN}/merged"]
    args = _container([svc, dep])["args"]
    assert args[:2] == ["--model", "/models/model"] and "--enable-lora" not in args
    assert args[args.index("--served-model-name") + 1] == "chat-assistant"
    assert args[args.index("--tensor-parallel-size") + 1] == "2"
    assert args[args.index("--max-model-len") + 1] == "4096"
    assert dep["spec"]["replicas"] == 2
    assert _container([svc, dep])["resources"]["limits"] == {"cpu": "16", "memory": "64Gi", "nvidia.com/gpu": "2"}


def test_full_model_on_cpu() -> None:
    svc, dep = _objects("full-cpu")
    server = _container([svc, dep])
    env = {e["name"]: e["value"] for e in server["env"]}
    assert env["VLLM_TARGET_DEVICE"] == "cpu" and env["VLLM_CPU_KVCACHE_SPACE"] == "3"  # a quarter of 12Gi
    assert server["resources"]["limits"] == {"cpu": "4", "memory": "12Gi"}
    assert "--enforce-eager" in server["args"] and "--enable-lora" not in server["args"]
    assert "tolerations" not in dep["spec"]["template"]["spec"]


def test_layout_fallback_and_default_served_name() -> None:
    svc, dep = _objects("adapter-cpu")
    pod = dep["spec"]["template"]["spec"]
    assert [i["command"][3] for i in pod["initContainers"]] == ["s3://models/smollm2-135m-instruct", f"{RUN}/model"]
    args = _container([svc, dep])["args"]
    assert args[args.index("--lora-modules") + 1] == "lora-chat=/models/model"  # the job's name


def test_hub_base_is_loaded_by_vllm_not_fetched() -> None:
    svc, dep = _objects("adapter-hub-base")
    pod = dep["spec"]["template"]["spec"]
    assert [i["name"] for i in pod["initContainers"]] == ["fetch-model"]
    server = _container([svc, dep])
    args = server["args"]
    assert args[:2] == ["--model", "HuggingFaceTB/SmolLM2-135M-Instruct"]
    assert args[args.index("--revision") + 1] == "main"
    assert args[args.index("--max-lora-rank") + 1] == "16"  # r=12 rounds up to vLLM's next bucket
    assert "HF_HUB_OFFLINE" not in {e["name"] for e in server["env"]}
    # The hub token of a gated base: by reference only, to the server that downloads (not the S3 fetch).
    token = [e for e in server["env"] if e["name"] == "HF_TOKEN"]
    assert token == [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hf-token", "key": "HF_TOKEN"}}}]
    assert "HF_TOKEN" not in {e["name"] for e in _container([svc, dep], "fetch-model").get("env", [])}


def test_tuned_lora_rank_sizes_the_bucket() -> None:
    def tuned(s: dict) -> None:
        s["tuning"] = {"trials": 2, "searchSpace": {"lora.r": {"type": "choice", "values": [8, 48]}}}

    plan = inference.serving_plan(Owner("lora-chat", "ml-team", OWNER_UID), _spec(tuned), None)
    assert plan.max_lora_rank == 64


@pytest.mark.parametrize(
    "change, model, reason",
    [
        (lambda s: s["model"].update(ggufFile="m.gguf"), None, c.UNSUPPORTED_MODEL),
        (lambda s: s["training"]["lora"].update(r=1000), None, c.UNSUPPORTED_MODEL),
        (
            lambda s: (s["output"].update(exportMerged=True), s["deploy"].update(mode="merged")),
            TRAINER_ADAPTER,
            c.MODEL_UNAVAILABLE,
        ),
    ],
)
def test_what_cannot_be_served_says_why(change: Any, model: dict | None, reason: str) -> None:
    with pytest.raises(inference.NotServable) as err:
        inference.serving_plan(Owner("lora-chat", "ml-team", OWNER_UID), _spec(change), model)
    assert err.value.reason == reason and "spec." in err.value.message


def test_merged_without_export_and_bad_served_names_are_refused_by_the_api() -> None:
    with pytest.raises(api.SpecError) as err:
        _spec(lambda s: s["deploy"].update(mode="merged"))
    assert ("spec.deploy.mode", "merged needs spec.output.exportMerged: true") in err.value.errors
    for bad in ("chat assistant", "a=b"):
        with pytest.raises(api.SpecError) as err:
            _spec(lambda s, b=bad: s["deploy"].update(servedModelName=b))
        assert [p for p, _ in err.value.errors] == ["spec.deploy.servedModelName"]


def test_names_start_with_a_letter_and_fit() -> None:
    assert names.inference("7b-chat").startswith("ftj-7b-chat-") and names.inference("7b-chat").endswith("-inference")
    long = names.inference("a" * 63)
    assert len(long) <= 63 and long[0].isalpha()
    assert names.inference("a" * 60 + "xyz") != names.inference("a" * 60 + "xyw")
