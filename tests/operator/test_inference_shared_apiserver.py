"""Shared multi-LoRA serving against the real API server, with the operator in-process: the test plays
KubeRay (runs succeed), the trainer (status.model) and the Deployment controller with its kubelets.

It applies docs/serving.md's manifests (the declaration and a job) and sees: adapters registered while the
server is not declared yet (ServerNotFound), the server's Deployment built with both jobs' adapters once it
is, both jobs Deployed on the same endpoint under their own model names, a third job refused for a taken
model name, a deleted job's adapter dropped from the server by the garbage collector + the operator, an
invalid declaration reported naming the field, the server gone with its declaration, the job back on a
dedicated server. Also the ETA column.

And (docs/serving.md's hf:// declaration) that a job trained with another chat template than its server's is
refused and left off the server, and that an hf:// server whose tokenSecretRef Secret or key is missing is
not built, its job told so (SecretNotFound, SecretKeyMissing), until the key exists.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_support import condition, events, get_columns, put_s3_secret, wait_for

from kubetune import chat_templates
from kubetune_cli.localenv.kubelet import DeploymentController
from kubetune_operator import guards, names
from kubetune_operator.builders import shared_server as ss
from kubetune_operator.kube import CONFIGMAP, DEPLOYMENT, FINETUNEJOB, KINDS, RAYJOB, SERVICE

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

DOC = Path(__file__).resolve().parents[2] / "docs" / "serving.md"
WAIT = 45
SECRET_VALUE = "kubetune-secret-value-do-not-leak"
SERVER = "chat-pool"


def doc_manifests() -> list[dict[str, Any]]:
    """The YAML blocks docs/serving.md marks as applied by this test, in order."""
    blocks = re.findall(
        r"<!-- applied by tests/operator/test_inference_shared_apiserver.py -->\n```yaml\n(.*?)```",
        DOC.read_text(),
        re.S,
    )
    return [yaml.safe_load(b) for b in blocks]


@pytest.fixture(scope="module")
def deployments(kubeconfig: Any) -> Iterator[DeploymentController]:
    with DeploymentController(kubeconfig) as dc:
        yield dc


def _ftj(kube: Any, ns: str, name: str) -> dict[str, Any]:
    return kube.get(FINETUNEJOB, ns, name) or {}


def _deployed(kube: Any, ns: str, name: str, status: str, reason: str) -> dict[str, Any]:
    def ok() -> dict[str, Any] | None:
        job = _ftj(kube, ns, name)
        c = condition(job, "Deployed")
        return job if (c.get("status"), c.get("reason")) == (status, reason) else None

    try:
        return wait_for(f"{name}: Deployed={status} ({reason})", ok, timeout=WAIT)
    except AssertionError as e:
        raise AssertionError(f"{e}\nnow: {_ftj(kube, ns, name).get('status', {}).get('conditions')}") from None


def _job(template: dict[str, Any], name: str, model: str) -> dict[str, Any]:
    m = copy.deepcopy(template)
    m["metadata"]["name"] = name
    m["spec"]["deploy"]["servedModelName"] = model
    return m


def _train(kube: Any, kuberay: Any, ns: str, name: str) -> None:
    rj = wait_for(f"RayJob of {name}", lambda: kube.get(RAYJOB, ns, names.ray_job(name)), timeout=WAIT)
    kuberay.start(ns, rj["metadata"]["name"])
    job = _ftj(kube, ns, name)
    kube.patch_status(
        FINETUNEJOB,
        ns,
        name,
        {
            "model": {
                "uri": f"s3://kubetune-runs/chat/{ns}/{name}/{job['metadata']['uid']}/model",
                "baseUri": job["spec"]["model"]["uri"],
                "kind": "adapter",
            }
        },
    )
    kuberay.succeed(ns, rj["metadata"]["name"])


def _server_models(kube: Any, ns: str) -> set[str] | None:
    dep = kube.get(DEPLOYMENT, ns, SERVER)
    return None if dep is None else ss.served_models(dep)


def test_shared_server_serves_every_registered_adapter(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    deployments: DeploymentController,
    namespace: str,
) -> None:
    ns = namespace
    put_s3_secret(kube, ns, "AKIAKUBETUNETEST0003", SECRET_VALUE)
    declaration, job_manifest = doc_manifests()[:2]
    assert job_manifest["spec"]["deploy"]["server"] == SERVER

    # Two jobs train before the server is declared: both register, both wait for it.
    kubectl.apply(job_manifest, ns)
    kubectl.apply(_job(job_manifest, "legal-bot", "legal"), ns)
    for job in ("support-bot", "legal-bot"):
        _train(kube, kuberay, ns, job)
    for job in ("support-bot", "legal-bot"):
        body = _deployed(kube, ns, job, "False", "ServerNotFound")
        assert f"ConfigMap {SERVER} labelled {ss.LABEL_SERVER}={SERVER}" in condition(body, "Deployed")["message"]
        assert "endpoint" not in body["status"]
    regs = kube.list(CONFIGMAP, ns, f"{ss.LABEL_SERVER}={SERVER}")
    assert sorted(json.loads(r["data"][ss.REGISTRATION_KEY])["model"] for r in regs) == ["legal", "support"]
    assert kube.get(DEPLOYMENT, ns, names.inference("support-bot")) is None  # no dedicated server

    # The declaration: one server with both adapters; neither job is Deployed until its replicas are ready.
    kubectl.apply(declaration, ns)
    wait_for("server with both adapters", lambda: _server_models(kube, ns) == {"support", "legal"}, timeout=WAIT)
    dep, svc = kube.get(DEPLOYMENT, ns, SERVER), kube.get(SERVICE, ns, SERVER)
    assert svc is not None and dep["spec"]["replicas"] == 2
    decl_uid = kube.get(CONFIGMAP, ns, SERVER)["metadata"]["uid"]
    assert dep["metadata"]["ownerReferences"][0]["uid"] == decl_uid
    assert SECRET_VALUE not in json.dumps([dep, svc, regs])
    _deployed(kube, ns, "support-bot", "False", "Progressing")
    deployments.available(ns, SERVER)
    for job, model in (("support-bot", "support"), ("legal-bot", "legal")):
        body = _deployed(kube, ns, job, "True", "Available")
        assert body["status"]["endpoint"] == {"url": f"http://{SERVER}.{ns}.svc:8000/v1", "model": model}
    assert get_columns(kubectl, ns, "legal-bot")["ENDPOINT"] == f"http://{SERVER}.{ns}.svc:8000/v1"

    # A third job asking for a model name the server already serves is refused, naming the field.
    kubectl.apply(_job(job_manifest, "copycat", "support"), ns)
    _train(kube, kuberay, ns, "copycat")
    body = _deployed(kube, ns, "copycat", "False", "ServerRefused")
    assert "spec.deploy.servedModelName" in condition(body, "Deployed")["message"]
    assert _server_models(kube, ns) == {"support", "legal"}

    # Deleting a job: the garbage collector removes its registration, the operator rolls the server without it.
    kubectl.run("delete", "ftj", "support-bot", "-n", ns, "--wait=false")
    kubectl.run("delete", "ftj", "copycat", "-n", ns, "--wait=false")
    wait_for("server without support", lambda: _server_models(kube, ns) == {"legal"}, timeout=90)
    deployments.available(ns, SERVER)
    _deployed(kube, ns, "legal-bot", "True", "Available")

    # An invalid declaration is reported in the jobs that use it, naming the key; fixing it serves again.
    good = kube.get(CONFIGMAP, ns, SERVER)["data"][ss.DECLARATION_KEY]
    kube.patch(
        CONFIGMAP, ns, SERVER, {"data": {ss.DECLARATION_KEY: good.replace("maxLoraRank: 16", "maxLoraRank: 12")}}
    )
    body = _deployed(kube, ns, "legal-bot", "False", "ServerInvalid")
    assert "server.yaml: maxLoraRank: must be one of" in condition(body, "Deployed")["message"]
    kube.patch(CONFIGMAP, ns, SERVER, {"data": {ss.DECLARATION_KEY: good}})
    _deployed(kube, ns, "legal-bot", "True", "Available")

    # The ETA column shows the trainer's estimate.
    kube.patch_status(FINETUNEJOB, ns, "legal-bot", {"progress": {"step": 5, "totalSteps": 10, "etaSeconds": 42}})
    wait_for("ETA column", lambda: get_columns(kubectl, ns, "legal-bot").get("ETA(S)") == "42", timeout=WAIT)

    # The server goes with its declaration; the job waits for a new one.
    kube.delete(CONFIGMAP, ns, SERVER)
    wait_for("server removed", lambda: kube.get(DEPLOYMENT, ns, SERVER) is None, timeout=90)
    _deployed(kube, ns, "legal-bot", "False", "ServerNotFound")

    # Back to a dedicated server: the registration goes, the job's own Deployment comes.
    kube.patch(FINETUNEJOB, ns, "legal-bot", {"spec": {"deploy": {"server": None}}})
    wait_for(
        "registration removed", lambda: kube.get(CONFIGMAP, ns, ss.registration_name("legal-bot")) is None, timeout=WAIT
    )
    wait_for("dedicated Deployment", lambda: kube.get(DEPLOYMENT, ns, names.inference("legal-bot")), timeout=WAIT)
    body = _deployed(kube, ns, "legal-bot", "False", "Progressing")
    assert body["status"]["endpoint"]["url"].startswith(f"http://{names.inference('legal-bot')}.{ns}.svc")


def test_shared_server_refuses_another_chat_template_and_waits_for_its_token(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    namespace: str,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # The operator (in-process) looks at a missing Secret or key again every guards.SECRET_RETRY_S (15 s), read
    # when it raises the retry; the test waits for two such re-checks, and what it shows is that the operator
    # waits and then builds, not how long it waits: a 2 s period instead.
    monkeypatch.setattr(guards, "SECRET_RETRY_S", 2.0)
    ns = namespace
    declaration, job_manifest, hub_declaration = doc_manifests()
    hub = hub_declaration["metadata"]["name"]
    hub_spec = yaml.safe_load(hub_declaration["data"][ss.DECLARATION_KEY])
    ref = hub_spec["tokenSecretRef"]
    assert hub_spec["baseModel"].startswith("hf://") and "chatTemplate" not in declaration["data"][ss.DECLARATION_KEY]
    token = "hf_kubetune-test-token-do-not-leak"
    retry = guards.SECRET_RETRY_S + 15  # the operator looks at Secrets again every SECRET_RETRY_S

    # Two servers: chat-pool (the base's own template), and the hub one whose token Secret does not exist yet.
    # Job templated trained with chatml for chat-pool; hub-bot with the hub server's template, for it.
    templated = _job(job_manifest, "templated", "templated")
    templated["spec"]["dataset"]["chatTemplate"] = "chatml"
    hub_job = _job(job_manifest, "hub-bot", "hub")
    hub_job["spec"]["model"] = {"uri": hub_spec["baseModel"]}
    hub_job["spec"]["dataset"]["chatTemplate"] = hub_spec["chatTemplate"]
    hub_job["spec"]["deploy"]["server"] = hub
    for manifest in (declaration, hub_declaration, templated, hub_job):
        kubectl.apply(manifest, ns)
    for job in ("templated", "hub-bot"):
        _train(kube, kuberay, ns, job)

    body = _deployed(kube, ns, "hub-bot", "False", "SecretNotFound")
    message = condition(body, "Deployed")["message"]
    assert f"Secret {ns}/{ref['name']} (tokenSecretRef in server.yaml of inference server {hub})" in message
    assert kube.get(DEPLOYMENT, ns, hub) is None and kube.get(SERVICE, ns, hub) is None
    secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": ref["name"], "namespace": ns}}
    kube.create({**secret, "stringData": {"token": token}})  # the token under another key than tokenSecretRef's

    # Meanwhile: chatml is not chat-pool's template; the adapter is registered with its digest, not served.
    body = _deployed(kube, ns, "templated", "False", "ChatTemplateMismatch")
    message = condition(body, "Deployed")["message"]
    assert "the named template chatml" in message and "the base model's own template" in message
    assert f"inference server {SERVER}" in message
    reg = json.loads(kube.get(CONFIGMAP, ns, ss.registration_name("templated"))["data"][ss.REGISTRATION_KEY])
    assert (reg["chatTemplate"], reg["usesChatTemplate"]) == (ss.template_digest("chatml"), True)
    assert _server_models(kube, ns) == set()  # built after the registration was read: without the adapter
    # The server declared with chatml (by name): the adapter is served, vLLM gets the template itself.
    good = kube.get(CONFIGMAP, ns, SERVER)["data"][ss.DECLARATION_KEY]
    kube.patch(CONFIGMAP, ns, SERVER, {"data": {ss.DECLARATION_KEY: good + "chatTemplate: chatml\n"}})
    wait_for("chat-pool with templated", lambda: _server_models(kube, ns) == {"templated"}, timeout=WAIT)
    args = kube.get(DEPLOYMENT, ns, SERVER)["spec"]["template"]["spec"]["containers"][0]["args"]
    assert args[args.index("--chat-template") + 1] == chat_templates.CHATML
    _deployed(kube, ns, "templated", "False", "Progressing")

    # Back to the hub server: the Secret exists without the key, then gets it; no Deployment until then.
    body = _deployed(kube, ns, "hub-bot", "False", "SecretKeyMissing")
    message = condition(body, "Deployed")["message"]
    assert f"Secret {ns}/{ref['name']}" in message and f"has no key {ref['key']}" in message and hub in message
    assert token not in message
    assert kube.get(DEPLOYMENT, ns, hub) is None
    kube.patch(KINDS[("v1", "Secret")], ns, ref["name"], {"stringData": {ref["key"]: token}})
    dep = wait_for(f"Deployment {hub}", lambda: kube.get(DEPLOYMENT, ns, hub), timeout=retry)
    env = {e["name"]: e for e in dep["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["HF_TOKEN"] == {
        "name": "HF_TOKEN",
        "valueFrom": {"secretKeyRef": {"name": ref["name"], "key": ref["key"]}},
    }
    assert ss.served_models(dep) == {"hub"}
    body = _deployed(kube, ns, "hub-bot", "False", "Progressing")
    hub_events = events(kubectl, ns, "hub-bot")
    assert {("Warning", "SecretNotFound"), ("Warning", "SecretKeyMissing")} <= {e[:2] for e in hub_events}
    assert token not in json.dumps([body, hub_events, dep, kube.list(CONFIGMAP, ns, f"{ss.LABEL_SERVER}={hub}")])
