"""Shared multi-LoRA server builders (pure): the server's Deployment and Service for a declaration and its
registered adapters, compared with a golden YAML file, and the rules that decide which adapters it serves.

Regenerate after an intended change with `KUBETUNE_UPDATE_GOLDEN=1 pytest tests/operator/test_inference_shared.py`
and review the diff of tests/golden/shared-server-*.yaml like code.
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api, chat_templates
from kubetune_operator.builders import shared_server as ss
from kubetune_operator.meta import LABEL_JOB, Owner
from kubetune_operator.settings import Settings

pytestmark = pytest.mark.unit

GOLDEN = Path(__file__).resolve().parents[2] / "tests" / "golden"
BASE = "s3://kubetune-models/smollm2-135m"
DECLARATION_UID = "00000000-0000-4000-8000-0000000000aa"


def _declaration(text: str | None = None) -> dict[str, Any]:
    text = (
        text
        if text is not None
        else (
            f"baseModel: {BASE}\nreplicas: 2\nresources: {{gpus: 0, cpu: '4', memory: 8Gi}}\nmaxLoraRank: 16\n"
            "maxLoras: 2\nendpoint: http://seaweedfs.storage.svc:8333\ncredentialsSecret: base-s3\n"
        )
    )
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": "chat-pool",
            "namespace": "ml-team",
            "uid": DECLARATION_UID,
            "labels": {ss.LABEL_SERVER: "chat-pool"},
        },
        "data": {ss.DECLARATION_KEY: text},
    }


def _adapter(
    job: str,
    model: str,
    *,
    rank: int = 8,
    base: str = BASE,
    created: str = "2026-01-01T00:00:00Z",
    secret: str = "team-s3",
    template: str | None = None,
    uses_template: bool = True,
) -> ss.Adapter:
    return ss.Adapter(
        job=job,
        model=model,
        uri=f"s3://kubetune-runs/ml-team/{job}/uid/model",
        base_uri=base,
        rank=rank,
        endpoint="http://seaweedfs.storage.svc:8333",
        secret=secret,
        created=created,
        chat_template=ss.template_digest(template),
        uses_chat_template=uses_template,
    )


def _golden(name: str, objects: list[dict[str, Any]]) -> None:
    text = yaml.safe_dump_all(objects, sort_keys=True)
    path = GOLDEN / name
    if os.environ.get("KUBETUNE_UPDATE_GOLDEN") == "1" or not path.exists():
        path.write_text(text)
    assert path.read_text() == text, f"{path} differs: review, then regenerate with KUBETUNE_UPDATE_GOLDEN=1"


def test_server_objects_match_golden() -> None:
    decl = _declaration()
    spec = ss.declaration_spec(decl)
    adapters = ss.usable_adapters(
        "chat-pool", spec, [_adapter("support-bot", "support"), _adapter("legal-bot", "legal", secret="legal-s3")]
    )
    dep = ss.deployment(decl, spec, adapters, Settings())
    _golden("shared-server-cpu.yaml", [ss.service(decl), dep])
    pod = dep["spec"]["template"]["spec"]
    # every adapter in the pod template: fetched by its own init container with its own job's Secret ...
    fetch = {c["name"]: c for c in pod["initContainers"]}
    assert list(fetch) == ["fetch-base", "fetch-legal-bot", "fetch-support-bot"]
    secrets = {
        n: {e["valueFrom"]["secretKeyRef"]["name"] for e in c["env"] if "valueFrom" in e} for n, c in fetch.items()
    }
    assert secrets == {"fetch-base": {"base-s3"}, "fetch-legal-bot": {"legal-s3"}, "fetch-support-bot": {"team-s3"}}
    # ... and named on the command line, so every replica and every restart serves it
    args = pod["containers"][0]["args"]
    i = args.index("--lora-modules")
    assert args[i + 1 : i + 3] == [f"legal={ss.ADAPTERS_DIR}/legal-bot", f"support={ss.ADAPTERS_DIR}/support-bot"]
    assert ss.served_models(dep) == {"legal", "support"}
    assert args[args.index("--max-lora-rank") + 1] == "16" and args[args.index("--max-loras") + 1] == "2"
    assert dep["spec"]["replicas"] == 2 and dep["spec"]["strategy"]["rollingUpdate"]["maxUnavailable"] == 0
    owner = dep["metadata"]["ownerReferences"][0]
    assert (owner["kind"], owner["uid"], owner["controller"]) == ("ConfigMap", DECLARATION_UID, True)
    assert LABEL_JOB not in dep["metadata"]["labels"]  # not one job's: the per-job Deployment watch ignores it


def test_adding_an_adapter_changes_the_pod_template() -> None:
    decl = _declaration()
    spec = ss.declaration_spec(decl)
    one = ss.deployment(decl, spec, [_adapter("a", "a")], Settings())
    two = ss.deployment(decl, spec, [_adapter("a", "a"), _adapter("b", "b")], Settings())
    assert one["spec"]["template"] != two["spec"]["template"]
    assert one["metadata"]["annotations"] != two["metadata"]["annotations"]  # the serving hash moves with it
    none = ss.deployment(decl, spec, [], Settings())
    assert "--lora-modules" not in none["spec"]["template"]["spec"]["containers"][0]["args"]
    assert ss.served_models(none) == set()


def test_refusals_name_the_field() -> None:
    spec = ss.declaration_spec(_declaration())
    older = _adapter("first", "shared-name", created="2026-01-01T00:00:00Z")
    newer = _adapter("second", "shared-name", created="2026-01-02T00:00:00Z")
    other_base = _adapter("elsewhere", "x", base="s3://kubetune-models/other")
    too_big = _adapter("big", "big", rank=32)
    all_ = [older, newer, other_base, too_big]
    assert ss.refusal("chat-pool", spec, older, all_) is None

    def refused(a: ss.Adapter) -> tuple[str, str]:
        verdict = ss.refusal("chat-pool", spec, a, all_)
        assert verdict is not None
        return verdict

    assert refused(newer)[0] == "ServerRefused"
    assert "already served on inference server chat-pool by job first" in refused(newer)[1]
    assert "serves base s3://kubetune-models/smollm2-135m" in refused(other_base)[1]
    assert "rank 32 exceeds" in refused(too_big)[1]
    assert [a.job for a in ss.usable_adapters("chat-pool", spec, all_)] == ["first"]


def test_an_hf_base_is_served_only_at_the_revision_the_adapter_trained_on() -> None:
    hub = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    spec = api.InferenceServerSpec.model_validate({"baseModel": hub, "revision": "a" * 40})
    same = dataclasses.replace(_adapter("same", "same", base=hub), base_revision="a" * 40)
    other = dataclasses.replace(_adapter("other", "other", base=hub), base_revision="b" * 40)
    unpinned = _adapter("loose", "loose", base=hub)
    assert ss.refusal("hub-pool", spec, same, [same]) is None
    verdict = ss.refusal("hub-pool", spec, other, [other])
    assert verdict is not None and verdict[0] == "ServerRefused"
    assert f"revision {'a' * 40}" in verdict[1] and f"trained on revision {'b' * 40}" in verdict[1]
    assert "trained on revision main" in (ss.refusal("hub-pool", spec, unpinned, [unpinned]) or ("", ""))[1]
    main = api.InferenceServerSpec.model_validate({"baseModel": hub, "revision": "main"})
    assert ss.refusal("hub-pool", main, unpinned, [unpinned]) is None  # unset is the hub's default, main
    wire = ss.adapter_of({"metadata": {"name": "r"}, "data": {ss.REGISTRATION_KEY: json.dumps(other.wire())}})
    assert wire is not None and wire.base_revision == "b" * 40


@pytest.mark.parametrize(
    ("text", "needle"),
    [
        ("replicas: 1\n", "baseModel: Field required"),
        (f"baseModel: {BASE}\nmaxLoraRank: 12\n", "maxLoraRank: must be one of"),
        (f"baseModel: {BASE}\nreplica: 2\n", "replica: Extra inputs are not permitted"),
        ("baseModel: [\n", "not YAML"),
        (f"baseModel: {BASE}\ntokenSecretRef: {{name: hub}}\n", "tokenSecretRef: applies to hf:// models only"),
        (f"baseModel: {BASE}\nchatTemplate: chat-ml\n", "chatTemplate: Value error, 'chat-ml' is neither"),
    ],
)
def test_invalid_declaration_names_the_field(text: str, needle: str) -> None:
    with pytest.raises(ss.InvalidDeclaration) as e:
        ss.declaration_spec(_declaration(text))
    assert needle in str(e.value) and "ConfigMap chat-pool server.yaml" in str(e.value)


def test_registration_is_owned_by_the_job_and_round_trips() -> None:
    owner = Owner(name="support-bot", namespace="ml-team", uid="u-1")
    adapter = _adapter("support-bot", "support")
    cm = ss.registration(owner, "chat-pool", adapter)
    assert cm["metadata"]["ownerReferences"][0]["uid"] == "u-1"
    assert cm["metadata"]["labels"][ss.LABEL_SERVER] == "chat-pool"
    assert cm["metadata"]["labels"][LABEL_JOB] == "support-bot"
    assert "AWS_SECRET_ACCESS_KEY" not in json.dumps(cm)  # the Secret's name only
    cm["metadata"]["creationTimestamp"] = adapter.created
    assert ss.adapter_of(cm) == adapter
    cm["metadata"]["deletionTimestamp"] = "2026-01-03T00:00:00Z"
    assert ss.adapter_of(cm) is None


def test_deploy_server_needs_a_lora_adapter() -> None:
    m = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "lora-chat.yaml").read_text())
    m["spec"]["deploy"]["server"] = "chat-pool"
    assert api.parse_manifest(m)[2].deploy.server == "chat-pool"
    m["spec"]["deploy"]["mode"] = "merged"
    with pytest.raises(api.SpecError) as e:
        api.parse_manifest(m)
    assert "spec.deploy.server" in str(e.value)


def test_trainers_chat_template_is_handed_to_vllm() -> None:
    """status.model.chatTemplate (a file the trainer wrote next to the model) -> --chat-template on that file."""
    from kubetune_operator.builders import inference

    m = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "lora-chat.yaml").read_text())
    spec = api.parse_manifest(m)[2]
    owner = Owner("lora-chat", "ml-team", "u-1")
    model = {
        "uri": "s3://kubetune-runs/chat/ml-team/lora-chat/u-1/model",
        "kind": "adapter",
        "chatTemplate": "chat_template.jinja",
    }
    plan = inference.serving_plan(owner, spec, model)
    args = inference.server_args(spec, plan)
    assert args[args.index("--chat-template") + 1] == f"{inference.MODEL_DIR}/chat_template.jinja"
    without = inference.server_args(spec, inference.serving_plan(owner, spec, {**model, "chatTemplate": None}))
    assert "--chat-template" not in without
    with pytest.raises(inference.NotServable) as e:
        inference.serving_plan(owner, spec, {**model, "chatTemplate": "../../etc/passwd"})
    assert "status.model.chatTemplate" in e.value.message


HF_DECLARATION = (
    "baseModel: hf://HuggingFaceTB/SmolLM2-135M-Instruct\nrevision: main\nreplicas: 1\n"
    "resources: {gpus: 1, cpu: '4', memory: 16Gi}\nmaxLoraRank: 16\nchatTemplate: chatml\n"
    "tokenSecretRef: {name: hub-token, key: token}\n"
)


def test_hub_base_gets_its_token_by_reference() -> None:
    """An hf:// base with tokenSecretRef: HF_TOKEN from the Secret by secretKeyRef, nothing fetched from S3."""
    decl = _declaration(HF_DECLARATION)
    spec = ss.declaration_spec(decl)
    base = "hf://HuggingFaceTB/SmolLM2-135M-Instruct"
    adapters = ss.usable_adapters("chat-pool", spec, [_adapter("support-bot", "support", base=base, template="chatml")])
    dep = ss.deployment(decl, spec, adapters, Settings())
    _golden("shared-server-hf.yaml", [dep])
    pod = dep["spec"]["template"]["spec"]
    env = {e["name"]: e for e in pod["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": "hub-token", "key": "token"}}}
    assert "HF_HUB_OFFLINE" not in env  # vLLM downloads the base
    assert [c["name"] for c in pod["initContainers"]] == ["fetch-support-bot"]
    args = pod["containers"][0]["args"]
    assert args[args.index("--revision") + 1] == "main"
    # a named template is resolved to its Jinja for vLLM (which would take a bare name for a file path)
    assert args[args.index("--chat-template") + 1] == chat_templates.CHATML
    # without tokenSecretRef, no token at all (a public base)
    public = ss.declaration_spec(
        _declaration(HF_DECLARATION.replace("tokenSecretRef: {name: hub-token, key: token}\n", ""))
    )
    names_ = [
        e["name"]
        for e in ss.deployment(decl, public, adapters, Settings())["spec"]["template"]["spec"]["containers"][0]["env"]
    ]
    assert "HF_TOKEN" not in names_


@pytest.mark.parametrize(
    ("server", "job", "uses", "refused"),
    [
        (None, None, True, False),  # both the base's own
        ("chatml", "chatml", True, False),
        ("chatml", chat_templates.CHATML, True, False),  # a name and its Jinja are one template
        ("chatml", chat_templates.CHATML + "\n", True, False),  # a YAML block's newline: Jinja drops it
        (None, "chatml", True, True),  # the base's own template may differ: not assumed to agree
        ("chatml", None, True, True),
        ("chatml", "zephyr", True, True),
        ("zephyr", None, False, False),  # completion text was never rendered with a template
    ],
)
def test_chat_template_decision(server: str | None, job: str | None, uses: bool, refused: bool) -> None:
    text = f"baseModel: {BASE}\n" + (f"chatTemplate: {json.dumps(server)}\n" if server else "")
    spec = ss.declaration_spec(_declaration(text))
    adapter = _adapter("support-bot", "support", template=job, uses_template=uses)
    verdict = ss.refusal("chat-pool", spec, adapter, [adapter])
    if not refused:
        assert verdict is None
        assert ss.usable_adapters("chat-pool", spec, [adapter]) == [adapter]
        return
    assert verdict is not None
    reason, message = verdict
    assert reason == "ChatTemplateMismatch"
    assert "spec.dataset.chatTemplate" in message and "inference server chat-pool" in message
    assert ss.usable_adapters("chat-pool", spec, [adapter]) == []  # left out of the server's Deployment


def test_job_template_from_the_spec() -> None:
    m = yaml.safe_load((Path(__file__).resolve().parents[2] / "examples" / "lora-chat.yaml").read_text())
    m["spec"]["dataset"].pop("chatTemplate", None)
    assert ss.job_template(api.parse_manifest(m)[2]) == (True, None)
    m["spec"]["dataset"]["chatTemplate"] = "zephyr"
    assert ss.job_template(api.parse_manifest(m)[2]) == (True, ss.template_digest("zephyr"))
    m["spec"]["dataset"]["format"] = "completion"
    m["spec"]["dataset"].pop("chatTemplate")
    assert ss.job_template(api.parse_manifest(m)[2])[0] is False
    # the registration carries it; one written before the field existed reads as "the base's own, conversational"
    owner = Owner(name="support-bot", namespace="ml-team", uid="u-1")
    cm = ss.registration(owner, "chat-pool", _adapter("support-bot", "support", template="zephyr"))
    registered = ss.adapter_of(cm)
    assert registered is not None and registered.chat_template == ss.template_digest("zephyr")
    data = json.loads(cm["data"][ss.REGISTRATION_KEY])
    del data["chatTemplate"], data["usesChatTemplate"]
    old = ss.adapter_of({**cm, "data": {ss.REGISTRATION_KEY: json.dumps(data)}})
    assert old is not None and (old.chat_template, old.uses_chat_template) == (None, True)
