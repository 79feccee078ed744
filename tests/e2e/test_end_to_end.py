"""The whole path on one machine: `kubetune dev up`, `kubectl apply` a small FineTuneJob, the operator makes a
RayJob, the local runtime trains it on a local Ray cluster (progress in the job's status on the way), the
operator deploys vLLM, the runtime runs it, an OpenAI chat request is answered, `kubectl delete` removes
everything, `kubetune dev down` stops everything.

Everything is real: kube-apiserver + etcd + kube-controller-manager, the operator (with its admission
webhook) as a subprocess, SeaweedFS, Ray, DeepSpeed, vLLM from the serving venv. Every wait is on a
condition with a hard deadline; a failure prints the job's status and the logs that explain it.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.waiting import free_port

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
NAME = "tiny-e2e"
DATA_URI = "s3://kubetune-e2e/fortunes/train.jsonl"
TRAIN_TIMEOUT_S = 420
DEPLOY_TIMEOUT_S = 300


def _kubetune(*args: str, env: dict[str, str], timeout: float) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args], env=env, capture_output=True, text=True, timeout=timeout
    )


def _free_port() -> int:
    return free_port()


def _listening(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(0.5)
        return s.connect_ex(("127.0.0.1", port)) == 0


class Cluster:
    """kubectl and the REST API of the dev cluster, plus diagnostics for failures."""

    def __init__(self, dev_dir: Path, env: dict[str, str]) -> None:
        from kubetune_cli.localenv.binaries import find_kubectl
        from kubetune_cli.localenv.rest import Rest

        self.dir = dev_dir
        self.env = {**env, "KUBECONFIG": str(dev_dir / "kubeconfig")}
        self.kubectl = str(find_kubectl())
        self.rest = Rest(dev_dir / "kubeconfig")

    def kubectl_run(self, *args: str, stdin: str | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.kubectl, *args], input=stdin, env=self.env, capture_output=True, text=True, timeout=60
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed: {proc.stderr}")
        return proc

    def job(self) -> dict[str, Any] | None:
        return self.rest.get(f"/apis/kubetune.io/v1alpha1/namespaces/default/finetunejobs/{NAME}")

    def conditions(self) -> dict[str, dict[str, Any]]:
        job = self.job() or {}
        return {c["type"]: c for c in (job.get("status") or {}).get("conditions") or []}

    def diagnostics(self) -> str:
        from kubetune_cli.localenv.processes import tail

        parts = [f"FineTuneJob status: {json.dumps((self.job() or {}).get('status'), indent=1)[:4000]}"]
        for rj in self.rest.items("/apis/ray.io/v1/namespaces/default/rayjobs"):
            parts.append(f"RayJob {rj['metadata']['name']} status: {json.dumps(rj.get('status'))}")
        parts.append(f"--- dev.log ---\n{tail(self.dir / 'logs' / 'dev.log', 40)}")
        parts.append(f"--- operator.log ---\n{tail(self.dir / 'logs' / 'operator.log', 30)}")
        for log in sorted(self.dir.glob("jobs/*/*/attempt-*/driver.log")) + sorted(self.dir.glob("serving/**/*.log")):
            parts.append(f"--- {log.relative_to(self.dir)} ---\n{tail(log, 25)}")
        return "\n".join(parts)

    def wait(self, what: str, check: Callable[[], Any], timeout: float, interval: float = 0.5) -> Any:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            result = check()
            if result:
                return result
            time.sleep(interval)
        pytest.fail(f"timed out after {timeout:.0f}s waiting for {what}\n{self.diagnostics()}")


@pytest.fixture
def dev(tmp_path: Path) -> Any:
    from kubetune_cli.localenv.vllm_server import serving_venv_dir, serving_venv_python

    if serving_venv_python() is None:
        pytest.skip(f"the vLLM serving venv is missing ({serving_venv_dir()}); build it with tools/serving-venv.sh")
    dev_dir = tmp_path / "dev"
    port = _free_port()
    env = {**os.environ, "KUBETUNE_DEV_DIR": str(dev_dir), "PYTHONUNBUFFERED": "1"}
    env.pop("KUBECONFIG", None)
    t0 = time.monotonic()
    up = _kubetune("dev", "up", "--s3-port", str(port), env=env, timeout=360)
    print(f"dev up: {time.monotonic() - t0:.1f}s\n{up.stdout}")
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        assert f"export KUBECONFIG={dev_dir / 'kubeconfig'}" in up.stdout
        cluster = Cluster(dev_dir, env)
        cluster.s3_port = port  # type: ignore[attr-defined]  # the test's own note on the fixture object
        yield cluster
    finally:
        t1 = time.monotonic()
        down = _kubetune("dev", "down", env=env, timeout=180)
        print(f"dev down: {time.monotonic() - t1:.1f}s {down.stdout.strip()}")
        assert down.returncode == 0, down.stdout + down.stderr
        assert not _listening(port), "the dev S3 port still answers after `kubetune dev down`"
        assert not (dev_dir / "dev.pid").exists()


def _upload_small_dataset(cluster: Cluster) -> None:
    """300 fortunes (the quickstart's sample, trimmed) into the dev S3, with the keys `dev up` keeps."""
    from kubetune.fetch import make_s3_client
    from kubetune_cli.localenv.s3endpoint import read_credentials
    from kubetune_cli.localenv.samples import fortune_instructions

    creds = read_credentials(cluster.dir / "s3" / "credentials.json")
    assert creds is not None
    client = make_s3_client(
        f"http://127.0.0.1:{cluster.s3_port}",  # type: ignore[attr-defined]  # set above
        access_key=creds["AWS_ACCESS_KEY_ID"],
        secret_key=creds["AWS_SECRET_ACCESS_KEY"],
    )
    client.create_bucket(Bucket="kubetune-e2e")
    records = fortune_instructions()[:300]
    body = "\n".join(json.dumps(r) for r in records) + "\n"
    client.put_object(Bucket="kubetune-e2e", Key=DATA_URI.split("/", 3)[3], Body=body.encode())


def test_apply_train_deploy_query_delete(dev: Cluster) -> None:
    timings: dict[str, float] = {}
    t0 = time.monotonic()
    manifest = yaml.safe_load((HERE / "tiny-job.yaml").read_text())
    manifest["spec"]["dataset"]["endpoint"] = f"http://127.0.0.1:{dev.s3_port}"  # type: ignore[attr-defined]  # set by the fixture
    _upload_small_dataset(dev)

    # The admission webhook refuses a bad manifest with the message `kubetune validate` gives.
    bad = json.loads(json.dumps(manifest))
    bad["spec"]["training"]["method"] = "full"  # with LoRA settings: a cross-field error
    refused = dev.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump(bad), check=False)
    assert refused.returncode != 0
    assert "spec.training.lora: LoRA settings are only allowed with method: lora" in refused.stderr

    dev.kubectl_run("apply", "-f", "-", stdin=yaml.safe_dump(manifest))
    progress_seen: list[dict[str, Any]] = []

    def succeeded() -> bool:
        job = dev.job() or {}
        st = job.get("status") or {}
        conds = {c["type"]: c for c in st.get("conditions") or []}
        if conds.get("Failed", {}).get("status") == "True":
            pytest.fail(f"the job failed: {conds['Failed']}\n{dev.diagnostics()}")
        done = conds.get("Succeeded", {}).get("status") == "True"
        if not done and (st.get("progress") or {}).get("step"):
            progress_seen.append(st["progress"])
        return done

    dev.wait("Succeeded", succeeded, TRAIN_TIMEOUT_S)
    timings["train"] = time.monotonic() - t0
    assert progress_seen, "status.progress never showed a step before the job succeeded"
    assert progress_seen[-1]["totalSteps"] == 4 and progress_seen[-1].get("loss") is not None
    job = dev.job()
    assert job is not None
    assert job["status"]["model"]["kind"] == "adapter"
    assert job["status"]["data"]["records"] == 300

    deployed = dev.wait(
        "Deployed", lambda: dev.conditions().get("Deployed", {}).get("status") == "True", DEPLOY_TIMEOUT_S
    )
    assert deployed
    timings["deploy"] = time.monotonic() - t0 - timings["train"]
    job = dev.job()
    assert job is not None
    endpoint = job["status"]["endpoint"]
    assert endpoint["model"] == "tiny" and endpoint["url"].endswith("/v1")

    # The Service's cluster address does not resolve on the host: the runtime put the local one on it.
    services = dev.rest.items("/api/v1/namespaces/default/services?labelSelector=kubetune.io%2Fjob%3Dtiny-e2e")
    local = next(
        s["metadata"]["annotations"]["kubetune.io/local-url"]
        for s in services
        if (s["metadata"].get("annotations") or {}).get("kubetune.io/local-url")
    )
    import openai

    client = openai.OpenAI(base_url=f"{local}/v1", api_key="unused", timeout=120, max_retries=2)
    assert {m.id for m in client.models.list().data} >= {"tiny", "tiny-base"}
    answer = client.chat.completions.create(
        model="tiny", max_tokens=8, temperature=0, messages=[{"role": "user", "content": "Tell me a fortune."}]
    )
    assert answer.choices[0].message.content, answer
    assert answer.usage is not None and answer.usage.completion_tokens > 0

    status = _kubetune("status", NAME, env=dev.env, timeout=60)
    assert status.returncode == 0, status.stderr
    assert "Deployed" in status.stdout and local in status.stdout and "step 4/4" in status.stdout
    columns = dev.kubectl_run("get", "ftj", NAME).stdout
    assert endpoint["url"] in columns

    # kubectl delete removes the job and, through owner references, everything it made; the runtime stops
    # the local server and the RayJob's finalizer goes.
    t1 = time.monotonic()
    dev.kubectl_run("delete", "ftj", NAME, "--wait=true", "--timeout=120s")

    def all_gone() -> bool:
        paths = [
            "/apis/ray.io/v1/namespaces/default/rayjobs",
            "/apis/apps/v1/namespaces/default/deployments",
            "/api/v1/namespaces/default/services?labelSelector=kubetune.io%2Fjob",
            "/api/v1/namespaces/default/configmaps?labelSelector=kubetune.io%2Fjob",
            "/api/v1/namespaces/default/serviceaccounts?labelSelector=kubetune.io%2Fjob",
        ]
        return dev.job() is None and not any(dev.rest.items(p) for p in paths)

    dev.wait("the job's objects to be deleted", all_gone, 120)
    port = int(local.rsplit(":", 1)[1])
    dev.wait("the local model server to stop", lambda: not _listening(port), 60)
    timings["delete"] = time.monotonic() - t1
    print("e2e timings: " + ", ".join(f"{k} {v:.0f}s" for k, v in timings.items()))
