"""Shared multi-LoRA serving on the real vLLM CPU server, end to end below training: the real API server (with
the garbage collector), the operator in-process, SeaweedFS holding a tiny base and two adapters, the local
kubelet (kubetune_cli.localenv.deployments) running the server's Deployment as local processes (init
containers fetching from S3, then vLLM from the serving venv). The test plays KubeRay and the trainer's
report (status.model).

One server start and one restart in all (vLLM on CPU starts in ~1-2 min):
1. two jobs' adapters on one server: both answer through the `openai` client under their own model names;
   the server renders a conversation with the declared chat template into exactly the token ids the
   trainer's tokenizer gives with it (`/tokenize` against `apply_chat_template`);
2. deleting one job: the server's pod is replaced without its adapter (the restart); afterwards its model
   name gets 404 while the other adapter, fetched again by the new pod, still answers.
"""

from __future__ import annotations

import copy
import json
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_support import condition, put_s3_secret, wait_for

from kubetune_cli.localenv.vllm_server import serving_venv_dir, serving_venv_python
from kubetune_operator import names
from kubetune_operator.builders import shared_server as ss
from kubetune_operator.kube import DEPLOYMENT, FINETUNEJOB, RAYJOB, SERVICE

pytestmark = [
    pytest.mark.serving,
    pytest.mark.slow,
    pytest.mark.timeout(1500),
    pytest.mark.skipif(
        serving_venv_python() is None,
        reason=f"no vLLM serving venv at {serving_venv_dir()}: run tools/serving-venv.sh (or set KUBETUNE_VLLM_VENV)",
    ),
]

SERVER = "chat-pool"
BUCKET = "kubetune-test"
START_S = 900  # init containers + a vLLM CPU start on a shared 2-core machine
# Not SmolLM2's own template: a server that ignored --chat-template would render other tokens.
TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
CHAT = [
    {"role": "system", "content": "You answer briefly."},
    {"role": "user", "content": "Name a fruit."},
    {"role": "assistant", "content": "A pear."},
    {"role": "user", "content": "And a colour?"},
]
GREEDY = {"temperature": 0, "max_tokens": 4, "extra_body": {"ignore_eos": True}}


def _random_lora(base: Path, out: Path, seed: int) -> Path:
    """A peft LoRA adapter (rank 8) with random non-zero weights, so that it changes the answers."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base)
    cfg = LoraConfig(r=8, lora_alpha=16, target_modules=["q_proj", "v_proj"], init_lora_weights=False)
    get_peft_model(model, cfg).save_pretrained(out)
    return out


def _upload(client: Any, folder: Path, prefix: str) -> str:
    for f in sorted(folder.rglob("*")):
        if f.is_file():
            client.upload_file(str(f), BUCKET, f"{prefix}/{f.relative_to(folder).as_posix()}")
    return f"s3://{BUCKET}/{prefix}"


@pytest.fixture(scope="module")
def artifacts(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    from kubetune_cli.localenv.models import tiny_llama

    root = tmp_path_factory.mktemp("shared-vllm")
    base = tiny_llama(root / "base", hidden=128, layers=2, heads=2, max_positions=512)
    return {
        "base": base,
        "support": _random_lora(base, root / "support", 1),
        "legal": _random_lora(base, root / "legal", 2),
    }


@pytest.fixture
def kubelet(kubeconfig: Path, tmp_path: Path) -> Iterator[Any]:
    from kubetune_cli.localenv.deployments import LocalKubelet

    rt = LocalKubelet(kubeconfig, tmp_path / "kubelet").start()
    yield rt
    rt.stop()


def _job(name: str, model: str, base_uri: str, s3: Any) -> dict[str, Any]:
    from test_inference_shared_apiserver import doc_manifests  # the job manifest docs/serving.md shows

    m = copy.deepcopy(doc_manifests()[1])
    m["metadata"]["name"] = name
    m["spec"]["model"]["uri"] = base_uri
    m["spec"]["dataset"].update(endpoint=s3.endpoint_url, train=f"s3://{BUCKET}/unused/train.jsonl")
    m["spec"]["output"]["uri"] = f"s3://{BUCKET}/runs"
    m["spec"]["deploy"]["servedModelName"] = model
    m["spec"]["dataset"]["chatTemplate"] = TEMPLATE  # trained with the server's template (else ChatTemplateMismatch)
    return m


def _declaration(base_uri: str, s3: Any) -> dict[str, Any]:
    server = {
        "baseModel": base_uri,
        "replicas": 1,
        "resources": {"gpus": 0, "cpu": "2", "memory": "4Gi"},
        "maxLoraRank": 8,
        "maxModelLen": 256,
        "dtype": "float32",
        "chatTemplate": TEMPLATE,
        "endpoint": s3.endpoint_url,
        "credentialsSecret": "s3-credentials",
    }
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": SERVER, "labels": {ss.LABEL_SERVER: SERVER}},
        "data": {ss.DECLARATION_KEY: yaml.safe_dump(server)},
    }


def _train(kube: Any, kuberay: Any, ns: str, name: str, adapter_uri: str, base_uri: str) -> None:
    rj = wait_for(f"RayJob of {name}", lambda: kube.get(RAYJOB, ns, names.ray_job(name)), timeout=60)
    kuberay.start(ns, rj["metadata"]["name"])
    kube.patch_status(FINETUNEJOB, ns, name, {"model": {"uri": adapter_uri, "baseUri": base_uri, "kind": "adapter"}})
    kuberay.succeed(ns, rj["metadata"]["name"])


def _local_url(kube: Any, ns: str) -> str | None:
    svc = kube.get(SERVICE, ns, SERVER) or {}
    return ((svc.get("metadata") or {}).get("annotations") or {}).get("kubetune.io/local-url")


def _models(url: str) -> set[str] | None:
    try:
        with urllib.request.urlopen(url + "/v1/models", timeout=10) as r:
            return {m["id"] for m in json.load(r)["data"]}
    except (OSError, ValueError, KeyError):
        return None


def _serving(kube: Any, ns: str, want: set[str]) -> str:
    """The server's local URL once it lists exactly `want` (plus the base)."""

    def ok() -> str | None:
        url = _local_url(kube, ns)
        return url if url and _models(url) == want | {f"{SERVER}-base"} else None

    return wait_for(f"server serving {sorted(want)}", ok, timeout=START_S, interval=2)


def _diagnostics(rt: Any) -> str:
    logs = sorted((rt.state_dir / "serving").rglob("*.log"))
    return "\n".join(f"--- {p}\n" + "\n".join(p.read_text(errors="replace").splitlines()[-25:]) for p in logs)


def test_two_adapters_on_one_vllm_server(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    kubelet: Any,
    s3_server: Any,
    namespace: str,
    artifacts: dict[str, Path],
    kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import openai
    from transformers import AutoTokenizer

    ns = namespace
    client = s3_server.client()
    base_uri = _upload(client, artifacts["base"], f"{ns}/base")
    adapters = {m: _upload(client, artifacts[m], f"{ns}/{m}") for m in ("support", "legal")}
    put_s3_secret(kube, ns, s3_server.access_key, s3_server.secret_key)  # the namespace's has dummy keys
    for model in ("support", "legal"):
        kubectl.apply(_job(f"{model}-bot", model, base_uri, s3_server), ns)
        _train(kube, kuberay, ns, f"{model}-bot", adapters[model], base_uri)
    for model in ("support", "legal"):  # registered, waiting for the server's declaration
        wait_for(
            f"{model}-bot ServerNotFound",
            lambda m=model: (
                condition(kube.get(FINETUNEJOB, ns, f"{m}-bot") or {}, "Deployed").get("reason") == "ServerNotFound"
            ),
            timeout=60,
        )

    # 1. One server start with both adapters.
    kubectl.apply(_declaration(base_uri, s3_server), ns)
    t0 = time.monotonic()
    try:
        url = _serving(kube, ns, {"support", "legal"})
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnostics(kubelet)}") from None
    print(f"\nshared server up with 2 adapters in {time.monotonic() - t0:.0f} s")
    for model in ("support", "legal"):
        wait_for(
            f"{model}-bot Deployed",
            lambda m=model: condition(kube.get(FINETUNEJOB, ns, f"{m}-bot") or {}, "Deployed").get("status") == "True",
            timeout=120,
        )
        status = kube.get(FINETUNEJOB, ns, f"{model}-bot")["status"]
        assert status["endpoint"] == {"url": f"http://{SERVER}.{ns}.svc:8000/v1", "model": model}
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    answers = {
        m: api.chat.completions.create(model=m, messages=CHAT, **GREEDY).choices[0].message.content
        for m in ("support", "legal")
    }
    assert all(isinstance(a, str) and a for a in answers.values()), answers

    # The trainer's rendering and the server's give the same token ids (and not those of the base's template).
    tok = AutoTokenizer.from_pretrained(artifacts["base"])
    ids = tok.apply_chat_template(CHAT, chat_template=TEMPLATE, tokenize=True, add_generation_prompt=True)
    ids = list(ids["input_ids"] if hasattr(ids, "keys") else ids)
    default = tok.apply_chat_template(CHAT, tokenize=True, add_generation_prompt=True)
    default = list(default["input_ids"] if hasattr(default, "keys") else default)
    req = urllib.request.Request(
        url + "/tokenize",
        method="POST",
        headers={"Content-Type": "application/json"},
        data=json.dumps({"model": "support", "messages": CHAT, "add_generation_prompt": True}).encode(),
    )
    with urllib.request.urlopen(req, timeout=60) as r:
        served_ids = json.load(r)["tokens"]
    assert served_ids == ids, (len(served_ids), len(ids))
    assert default != ids  # the check can fail: the base's own template renders differently

    # 2. Deleting a job: the pod is replaced without its adapter (the one restart); 404 for it, the other answers.
    assert len(list((kubelet.state_dir / "serving").rglob("vllm.log"))) == 1  # one server start so far
    kubectl.run("delete", "ftj", "support-bot", "-n", ns, "--wait=false")
    wait_for(
        "server Deployment without support",
        lambda: ss.served_models(kube.get(DEPLOYMENT, ns, SERVER) or {}) == {"legal"},
        timeout=120,
    )
    t0 = time.monotonic()
    try:
        url = _serving(kube, ns, {"legal"})
    except AssertionError as e:
        raise AssertionError(f"{e}\n{_diagnostics(kubelet)}") from None
    print(f"shared server restarted with 1 adapter in {time.monotonic() - t0:.0f} s")
    assert len(list((kubelet.state_dir / "serving").rglob("vllm.log"))) == 2  # a new pod: the one restart
    api = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=120)
    with pytest.raises(openai.NotFoundError):
        api.chat.completions.create(model="support", messages=CHAT, **GREEDY)
    again = api.chat.completions.create(model="legal", messages=CHAT, **GREEDY).choices[0].message.content
    assert again == answers["legal"]  # greedy: the same adapter, fetched again by the new pod, answers the same
    wait_for(
        "legal-bot Deployed after the restart",
        lambda: condition(kube.get(FINETUNEJOB, ns, "legal-bot") or {}, "Deployed").get("status") == "True",
        timeout=120,
    )

    # `kubetune logs --serving` of a job on the server: the current pod's vLLM log (not the replaced pod's),
    # naming the shared server (kubetune_cli.logs).
    from kubetune_cli.main import main

    pods = sorted((kubelet.state_dir / "serving" / ns / SERVER).glob("*/vllm.log"), key=lambda p: p.stat().st_mtime)
    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    capsys.readouterr()
    rc = main(["logs", "--serving", "legal-bot", "-n", ns, "--dir", str(kubelet.state_dir)])
    out, err = capsys.readouterr()
    assert rc == 0, err
    assert f"served as model legal on the shared inference server {SERVER}" in err, err
    current = pods[-1].read_bytes().decode("utf-8", "replace")  # as written: vLLM's progress bars carry \r
    assert out.strip() and current.startswith(out), out[-2000:]
