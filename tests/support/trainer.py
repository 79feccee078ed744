"""Helpers for the trainer tests: a tiny random Llama in S3, datasets in each format, and running the trainer.

Everything is real: SeaweedFS (the session's `s3_server`), Ray, DeepSpeed over gloo, transformers and peft.
The trainer runs as `python -m kubetune_trainer --config FILE` in a subprocess, exactly as a RayJob's
entrypoint runs it: it joins a Ray cluster through RAY_ADDRESS (one `ray start --head` for the session,
playing KubeRay's RayCluster; its workers have the cluster's environment, as pods do). One test runs with
`--local` instead, where the trainer starts its own Ray. Exit codes and the final line are tested too, and a
hung run is killed by the subprocess timeout instead of hanging the suite.

The machine has 2 cores shared with other test runs: models are tiny (hidden 64, 2 layers, the real
49,152-token SmolLM2 tokenizer), sequences 32 tokens, a handful of steps, OMP_NUM_THREADS=1.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from tests.support.s3 import BUCKET

FORTUNES = Path("/usr/share/games/fortunes")
TRAINER_TIMEOUT_S = 420  # one tiny run takes 60-140 s on a busy 2-core machine


def fortunes(name: str = "computers", limit: int | None = None) -> list[str]:
    """Real English text: the entries of one Debian `fortunes` file."""
    path = FORTUNES / name
    if not path.is_file():
        pytest.skip(f"{path} is missing (apt package fortunes)")
    entries = [e.strip() for e in path.read_text(errors="replace").split("\n%\n")]
    entries = [e for e in entries if e]
    return entries[:limit] if limit else entries


def put_jsonl(client: Any, uri: str, records: list[dict[str, Any]]) -> str:
    bucket, key = uri[len("s3://") :].split("/", 1)
    client.put_object(Bucket=bucket, Key=key, Body=("\n".join(json.dumps(r) for r in records) + "\n").encode())
    return uri


def put_parquet(client: Any, uri: str, records: list[dict[str, Any]]) -> str:
    import io

    import pyarrow as pa
    import pyarrow.parquet as pq

    buf = io.BytesIO()
    pq.write_table(pa.Table.from_pylist(records), buf)
    bucket, key = uri[len("s3://") :].split("/", 1)
    client.put_object(Bucket=bucket, Key=key, Body=buf.getvalue())
    return uri


def process_env(s3: Any, workdir: Path) -> dict[str, str]:
    """Environment of the trainer's processes, the driver's and (through the Ray cluster) the workers'."""
    return {
        **s3.env(),  # S3 keys: in a pod they come from the job's Secret
        "OMP_NUM_THREADS": "1",
        "MKL_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "RAY_DEDUP_LOGS": "0",
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "KUBETUNE_MODEL_CACHE": str(workdir / "model-cache"),
        "KUBETUNE_RAY_STORAGE": str(workdir / "ray"),
        "KUBETUNE_STAGING_DIR": str(workdir),
    }


@dataclass
class TrainerRun:
    returncode: int
    output: str
    seconds: float
    config: dict[str, Any]

    @property
    def final_line(self) -> str:
        lines = [ln for ln in self.output.splitlines() if ln.startswith("kubetune-trainer: ")]
        return lines[-1] if lines else ""


@dataclass
class TrainerEnv:
    """What every trainer test needs: S3, the tiny base model's URI, and a way to run the trainer."""

    s3: Any
    client: Any
    model_uri: str
    workdir: Path
    ray_cluster: Any

    def config(
        self,
        name: str,
        spec: dict[str, Any],
        reporting: dict[str, Any] | None = None,
        job: dict[str, Any] | None = None,
    ) -> dict[str, Any]:
        """A resolved TrainerConfig (wire form) whose outputs go under s3://BUCKET/runs/<name>."""
        spec = {"deploy": {"enabled": False}, "output": {"uri": f"s3://{BUCKET}/runs"}, **spec}
        # One CPU per worker: the session's Ray cluster advertises two.
        spec.setdefault("resources", {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": "1"})
        spec["dataset"].setdefault("endpoint", self.s3.endpoint_url)
        return {
            "job": job or {"name": name, "namespace": "tests"},
            "spec": spec,
            "runUri": f"s3://{BUCKET}/runs/tests/{name}",
            "reporting": reporting or {"kubernetes": False, "minIntervalSeconds": 0},
        }

    def run(
        self,
        config: dict[str, Any],
        env: dict[str, str] | None = None,
        local: bool = False,
        timeout: float = TRAINER_TIMEOUT_S,
    ) -> TrainerRun:
        """Run the trainer on `config`; `env` adds to the driver's environment (the pods' is the cluster's)."""
        name = config["job"]["name"]
        path = self.workdir / f"{name}-{int(time.time() * 1000)}.json"
        path.write_text(json.dumps(config))
        full_env = {**os.environ, **process_env(self.s3, self.workdir), **(env or {})}
        full_env.pop("RAY_ADDRESS", None)
        argv = [sys.executable, "-m", "kubetune_trainer", "--config", str(path)]
        if local:
            argv.append("--local")
        else:
            full_env.update(self.ray_cluster.driver_env())
        t0 = time.monotonic()
        try:
            proc = subprocess.run(
                argv,
                env=full_env,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                text=True,
                timeout=timeout,
                start_new_session=True,
            )
            out, rc = proc.stdout, proc.returncode
        except subprocess.TimeoutExpired as exc:
            out = exc.stdout.decode(errors="replace") if isinstance(exc.stdout, bytes) else (exc.stdout or "")
            pytest.fail(f"the trainer did not finish within {timeout}s; last output:\n{out[-4000:]}")
        seconds = time.monotonic() - t0
        (self.workdir / f"{name}-{int(t0)}.log").write_text(out)
        print(f"trainer run {name}: rc={rc} {seconds:.1f}s")
        return TrainerRun(rc, out, seconds, config)

    def get_json(self, uri: str) -> Any:
        bucket, key = uri[len("s3://") :].split("/", 1)
        return json.loads(self.client.get_object(Bucket=bucket, Key=key)["Body"].read())

    def metrics(self, run_uri: str) -> list[dict[str, Any]]:
        bucket, key = f"{run_uri}/metrics.jsonl"[len("s3://") :].split("/", 1)
        body = self.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        return [json.loads(line) for line in body.splitlines() if line.strip()]

    def keys(self, prefix_uri: str) -> list[str]:
        bucket, key = prefix_uri[len("s3://") :].split("/", 1)
        out = []
        for page in self.client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=key + "/"):
            out += [o["Key"][len(key) + 1 :] for o in page.get("Contents", [])]
        return sorted(out)

    def download(self, prefix_uri: str, dest: Path) -> Path:
        bucket, key = prefix_uri[len("s3://") :].split("/", 1)
        for rel in self.keys(prefix_uri):
            target = dest / rel
            target.parent.mkdir(parents=True, exist_ok=True)
            self.client.download_file(bucket, f"{key}/{rel}", str(target))
        return dest


def assert_generates(model_dir: Path, adapter_dir: Path | None = None) -> str:
    """Load the exported model as vLLM's users would (transformers, peft for adapters) and generate."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(adapter_dir or model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir)
    if adapter_dir is not None:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter_dir)
    inputs = tokenizer("The computer", return_tensors="pt")
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert out.shape[1] == inputs["input_ids"].shape[1] + 5
    return tokenizer.decode(out[0])
