"""Pure parts of the local runtime and `kubetune run`: pod environment and volumes, RayCluster sizing,
listen-address rewriting, built-in URIs, the S3 endpoint rule, and the operator's RayJob run locally."""

from __future__ import annotations

import json
import socket
from pathlib import Path

import pytest

from kubetune import api

pytestmark = pytest.mark.unit


def _sandbox(tmp_path: Path, pod: dict, secrets: dict | None = None, cms: dict | None = None):
    from kubetune_cli.localenv.pod_sandbox import PodSandbox

    return PodSandbox(
        tmp_path,
        pod,
        namespace="ns",
        pod_name="p-0",
        config_maps=lambda n: (cms or {}).get(n),
        secrets=lambda n: (secrets or {}).get(n),
    )


def test_pod_env_and_volumes_resolve_like_the_kubelet(tmp_path: Path) -> None:
    from kubetune_cli.localenv.pod_sandbox import PodConfigError

    pod = {
        "volumes": [
            {"name": "cfg", "configMap": {"name": "job-config"}},
            {"name": "m", "emptyDir": {}},
            {"name": "keys", "secret": {"secretName": "s3", "items": [{"key": "id", "path": "k/id"}]}},
        ]
    }
    container = {
        "env": [
            {"name": "A", "value": "x"},
            {"name": "B", "value": "$(A)-$$(A)-$(NOPE)"},
            {"name": "KEY", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "id"}}},
            {"name": "TOKEN", "valueFrom": {"secretKeyRef": {"name": "s3", "key": "tok", "optional": True}}},
            {"name": "NS", "valueFrom": {"fieldRef": {"fieldPath": "metadata.namespace"}}},
            {"name": "CONFIG", "value": "/etc/kubetune/config.json"},
        ],
        "volumeMounts": [{"name": "cfg", "mountPath": "/etc/kubetune"}, {"name": "m", "mountPath": "/models"}],
        "command": ["python3", "-m", "x"],
        "args": ["--config=/etc/kubetune/config.json", "/models/model", "/modelsx"],
    }
    sb = _sandbox(tmp_path, pod, secrets={"s3": {"id": "AKIA"}}, cms={"job-config": {"config.json": "{}"}})
    sb.materialise()
    env = sb.env(container)
    assert env["B"] == "x-$(A)-$(NOPE)" and env["KEY"] == "AKIA" and "TOKEN" not in env and env["NS"] == "ns"
    assert env["CONFIG"] == str(tmp_path / "volumes" / "cfg" / "config.json")
    assert (tmp_path / "volumes" / "cfg" / "config.json").read_text() == "{}"
    assert (tmp_path / "volumes" / "keys" / "k" / "id").stat().st_mode & 0o777 == 0o600
    argv = sb.argv(container, env)
    assert argv[3] == f"--config={tmp_path}/volumes/cfg/config.json"
    assert argv[4] == f"{tmp_path}/volumes/m/model" and argv[5] == "/modelsx"
    missing = _sandbox(tmp_path, pod, secrets={}, cms={"job-config": {"config.json": "{}"}})
    with pytest.raises(PodConfigError, match='secret "s3" not found'):
        missing.materialise()


def test_operator_rayjob_sizes_the_local_cluster() -> None:
    from kubetune_cli.localenv.rayjob_local import cluster_resources
    from kubetune_operator import builders
    from kubetune_operator.meta import Owner
    from kubetune_operator.settings import Settings

    spec = api.parse_spec(
        {
            "model": {"uri": "s3://bkt/m"},
            "dataset": {"train": "s3://bkt/d", "format": "completion"},
            "resources": {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": "1500m"},
            "output": {"uri": "s3://bkt/o"},
        }
    )
    rj = builders.ray_job(Owner("j", "ns", "uid"), spec, Settings(), "h")
    assert cluster_resources(rj) == (2, 0)  # head num-cpus 0, 2 workers x floor(1.5)
    spec.resources.gpus_per_worker = 1
    rj = builders.ray_job(Owner("j", "ns", "uid"), spec, Settings(), "h")
    assert cluster_resources(rj)[1] == 2


def test_server_listen_address_is_rewritten_to_loopback() -> None:
    from kubetune_cli.localenv.deployments import _rewrite_listen

    argv = [
        "python3",
        "-m",
        "vllm",
        "--model",
        "/m",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
        "--port=8000",
        "--host=0.0.0.0",
        "--max-model-len",
        "256",
    ]
    assert _rewrite_listen(argv, {8000: 41000}) == [
        "python3",
        "-m",
        "vllm",
        "--model",
        "/m",
        "--host",
        "127.0.0.1",
        "--port",
        "41000",
        "--port=41000",
        "--host=127.0.0.1",
        "--max-model-len",
        "256",
    ]


def test_builtin_uris() -> None:
    from kubetune_cli.localenv import builtin

    items = builtin.referenced(
        [
            "s3://kubetune-samples/models/tiny-llama",
            "s3://kubetune-samples/datasets/fortunes-instruction/train.jsonl",
            "s3://kubetune-samples/datasets/fortunes-instruction/validation.jsonl",
            "s3://other/x",
            None,
        ]
    )
    assert [(i.kind, i.name) for i in items] == [("model", "tiny-llama"), ("dataset", "fortunes-instruction")]
    assert items[1].last_object.endswith("fortunes-instruction/train.jsonl")
    with pytest.raises(ValueError, match="built-in models: smollm2-135m-instruct, tiny-llama"):
        builtin.referenced(["s3://kubetune-samples/models/llama-70b"])


def test_s3_endpoint_rule(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    from kubetune_cli.localenv import s3endpoint

    assert s3endpoint.is_loopback("http://127.0.0.1:8333") and s3endpoint.is_loopback("http://localhost:9000")
    assert not s3endpoint.is_loopback("http://seaweedfs.storage.svc:8333") and not s3endpoint.is_loopback(None)
    monkeypatch.setenv("AWS_ACCESS_KEY_ID", "id")
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", "secret")
    external = s3endpoint.resolve("http://s3.example.com:9000", "eu-west-1")
    assert not external.kubetune_owned and external.env()["AWS_REGION"] == "eu-west-1"
    # Something that answers but is not an S3 server kubetune knows, without keys: a clear refusal.
    monkeypatch.delenv("AWS_ACCESS_KEY_ID")
    monkeypatch.delenv("AWS_SECRET_ACCESS_KEY")
    monkeypatch.setenv(s3endpoint.LOCAL_S3_DIR_ENV, str(tmp_path / "none"))
    monkeypatch.setenv("KUBETUNE_DEV_DIR", str(tmp_path / "nodev"))
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen(1)
        port = s.getsockname()[1]
        with pytest.raises(s3endpoint.S3EndpointError, match="not one of kubetune's local S3 servers"):
            s3endpoint.resolve(f"http://127.0.0.1:{port}", "us-east-1")


def test_progress_view_follows_a_growing_file(tmp_path: Path) -> None:
    from rich.console import Console

    from kubetune_cli.progress_view import FileFollower, TrainingView

    path = tmp_path / "p.jsonl"
    follower = FileFollower(path)
    assert follower.read() == []
    with open(path, "w") as f:
        f.write(json.dumps({"status": {"progress": {"step": 1, "totalSteps": 2, "loss": 3.0}}}) + '\n{"metr')
    console = Console(file=open(tmp_path / "out.txt", "w"), force_terminal=False, width=120)  # noqa: SIM115 - closed below
    view = TrainingView(console, "job")
    view.update(follower.read())
    with open(path, "a") as f:
        f.write('ic": {"step": 2, "loss": 2.5}}\n' + json.dumps({"status": {"progress": {"step": 2}}}) + "\n")
    view.update(follower.read())
    view.stop()
    console.file.close()
    assert view.metrics == [{"step": 2, "loss": 2.5}]
    assert view.status["progress"] == {"step": 2, "totalSteps": 2, "loss": 3.0}
    out = (tmp_path / "out.txt").read_text()
    assert "job: step 1/2 loss 3.0000" in out and "job: step 2/2" in out


def test_preference_pair_gives_the_sample_question() -> None:
    from kubetune_cli.query import sample_from_record

    ds = api.DatasetSpec.model_validate({"train": "s3://data/t.jsonl", "format": "preference"})
    text = sample_from_record({"prompt": "Tell me a fortune.", "chosen": "Good.", "rejected": "Bad."}, ds)
    assert text is not None and text.messages == [{"role": "user", "content": "Tell me a fortune."}]
    assert text.question == "Tell me a fortune." and text.reference == "Good."

    renamed = api.DatasetSpec.model_validate(
        {"train": "s3://data/t.jsonl", "format": "preference", "fields": {"prompt": "q", "chosen": "good"}}
    )
    chat = {
        "q": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi?"}],
        "good": [{"role": "assistant", "content": "Hello."}],
        "rejected": [{"role": "assistant", "content": "Go away."}],
    }
    sample = sample_from_record(chat, renamed)
    assert sample is not None and sample.messages == chat["q"]
    assert sample.question == "Hi?" and sample.reference == "Hello."
    assert sample_from_record({"prompt": 3, "chosen": "x"}, ds) is None


def test_served_chat_template_is_an_absolute_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """`kubetune run` from the repository gives a relative run folder; vLLM starts in the run folder, so the
    template file it is handed must not be relative (it was: the quickstart's vLLM refused to start)."""
    from kubetune_cli.run_serve import _template

    monkeypatch.chdir(tmp_path)
    model_dir = Path("runs") / "quickstart" / "model"
    model_dir.mkdir(parents=True)
    (model_dir / "chat_template.jinja").write_text("{{ messages }}")
    got = _template({"chatTemplate": "chat_template.jinja"}, model_dir)
    assert got is not None and Path(got).is_absolute() and Path(got) == (tmp_path / model_dir / "chat_template.jinja")
    assert _template({"chatTemplate": "../x.jinja"}, model_dir) is None  # only a file inside the model folder
    assert _template({"chatTemplate": "missing.jinja"}, model_dir) is None
