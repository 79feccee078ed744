"""Training throughput: the kubetune trainer against a bare PyTorch loop, same model, data and machine, one run.

    .venv/bin/python benchmarks/train_throughput.py [--hidden 128 --layers 2 --seq 64 --batch 4 --steps 40]
        [--zero-stages 2,3]
    .venv/bin/python benchmarks/train_throughput.py --model smollm2 [--seq 64 --batch 2 --steps 12]

What is compared. Both sides train the same model (`--model tiny`: a random small Llama with the SmolLM2
tokenizer; `--model smollm2`: the real SmolLM2-135M, converted once into the cache) on the same prepared rows
(Debian fortunes, tokenised and packed once by the trainer's own `prepare`), in the same order
(`batch_indices`), with the same number of processes, each limited to the same number of threads:

- kubetune: `python -m kubetune_trainer --local`, i.e. Ray Train workers running DeepSpeed ZeRO-2, the
  status/metrics reporter thread, the loss/token exchange and preemption check at sync steps (about every
  2 s of training), evaluations and checkpoints at their intervals, export at the end;
- bare: `torch.multiprocessing` processes, gloo DistributedDataParallel, torch AdamW, the same warmup+cosine
  schedule and gradient clipping: the loop one would write by hand.

Tokens/s is measured the same way on both sides, per optimizer step: real (non-padding) tokens of all workers
divided by the step's time (forward, backward, optimizer; for the trainer also the sync and reporting work,
counted into the steps it follows), as recorded by rank 0. The headline is the median over steps after the
first WARMUP_STEPS, which resists the bursts of other work on a shared machine; the plain mean (all tokens /
all step time, warm-up included) is the second ratio. The bare loop runs before and after the trainer (the two
are averaged), so a change of background load during the run shows up as a difference between the two bare
figures instead of as a bias.

What the bare loop does not do is printed as its own lines, as shares of the trainer's wall time: start-up
(time to first step by phase: Ray, data, workers, model load, DeepSpeed init, base evaluation), evaluations,
checkpoints (S3 uploads included), export, and the rest (reports, shutdown).

Peak memory per rank (the `peakMemoryMB` of the trainer's `finished` metrics line) is printed for every ZeRO
stage of `--zero-stages` (default 2,3): the first stage is the one compared with the bare loop, each further
stage runs the trainer once more on the same data, so the lines `peak memory per rank, ...` of ZeRO-2 and
ZeRO-3 come from one benchmark run. Checkpoints are uploaded in the background: the `checkpoints:` line splits
their time into the training thread's part (local write, waiting for the previous upload) and the upload.

Also printed: the data pipeline's rate (records/s through `prepare`: read, clean, dedup, tokenise, pack,
shard to S3) against the rate at which the trainer consumes records.

Every ratio is one line `ratio NAME: X (target: Y)`. On a shared machine the numbers move with other load
(the load average is printed at the start and the end): run it on an otherwise idle machine, and more than
once, before trusting a ratio.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
BUCKET = "kubetune-bench"


def bare_worker(
    rank: int, world: int, port: int, args: dict[str, Any], shards: list[str], env: dict[str, str], out: str
) -> None:
    """One process of the bare loop (DDP over gloo)."""
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import AutoModelForCausalLM, get_scheduler

    from kubetune_trainer.data import batch_indices, load_shard

    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_scheduler(
        "cosine", opt, num_warmup_steps=math.ceil(0.03 * args["steps"]), num_training_steps=args["steps"]
    )
    data = load_shard([shards[rank]])
    batches = batch_indices(len(data["input_ids"]), args["batch"], 0, 42)
    durations, cpu_durations, step_tokens = [], [], []
    for step in range(args["steps"]):
        rows = batches[step % len(batches)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        out_ = ddp(
            input_ids=torch.from_numpy(data["input_ids"][rows]).long(),
            position_ids=torch.from_numpy(data["position_ids"][rows]).long(),
            labels=torch.from_numpy(data["labels"][rows]).long(),
        )
        out_.loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        durations.append(time.perf_counter() - t0)
        cpu_durations.append(time.process_time() - cpu0)
        step_tokens.append(int(data["attention_mask"][rows].sum()))
    tokens = torch.tensor(step_tokens, dtype=torch.float64)
    dist.all_reduce(tokens)  # the tokens of all workers in each step
    if rank == 0:  # rank 0's step times, as the trainer reports them (DDP keeps the ranks in lockstep)
        Path(out).write_text(
            json.dumps({"stepTokens": tokens.tolist(), "stepSeconds": durations, "stepCpuSeconds": cpu_durations})
        )
    # No destroy_process_group(): with gloo it can wait forever for a peer that has already exited.


WARMUP_STEPS = 3
TARGET = 0.95  # kubetune's tokens/s at least this share of the bare loop's (mean and median)
# Per model: defaults sized for a 2-core machine (SmolLM2 steps take seconds each on a CPU).
MODEL_DEFAULTS = {"tiny": {"seq": 64, "batch": 4, "steps": 40}, "smollm2": {"seq": 64, "batch": 2, "steps": 12}}
STARTUP_KEYS = (
    "rayStartSeconds",
    "dataSeconds",
    "workerStartSeconds",
    "modelLoadSeconds",
    "deepspeedInitSeconds",
    "resumeSeconds",
    "baseEvalSeconds",
    "firstStepSeconds",
    "timeToFirstStepSeconds",
)


def rates(steps: dict[str, list[float]]) -> dict[str, float]:
    """Median tokens/s over the steps after warm-up (by wall time and by rank 0's CPU time) and the mean."""
    import statistics

    tokens, wall, cpu = steps["stepTokens"], steps["stepSeconds"], steps["stepCpuSeconds"]
    return {
        "median": statistics.median([t / s for t, s in zip(tokens, wall)][WARMUP_STEPS:]),
        "cpu": statistics.median([t / s for t, s in zip(tokens, cpu)][WARMUP_STEPS:]),
        "mean": sum(tokens) / sum(wall),
    }


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--model",
        choices=sorted(MODEL_DEFAULTS),
        default="tiny",
        help="tiny: a random 2-layer Llama; smollm2: the real SmolLM2-135M (converted once, cached)",
    )
    parser.add_argument("--hidden", type=int, default=128, help="tiny model only")
    parser.add_argument("--layers", type=int, default=2, help="tiny model only")
    parser.add_argument("--seq", type=int)
    parser.add_argument("--batch", type=int)
    parser.add_argument("--steps", type=int)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=1000)
    parser.add_argument(
        "--eval-every",
        type=int,
        default=20,
        help="the trainer evaluates every N steps (0: never); the bare loop does not",
    )
    parser.add_argument(
        "--checkpoint-every",
        type=int,
        default=20,
        help="the trainer checkpoints to S3 every N steps (and at the end); the bare loop does not",
    )
    parser.add_argument(
        "--zero-stages",
        default="2,3",
        help="DeepSpeed ZeRO stages the trainer runs with (comma-separated); the first is compared with the bare "
        "loop, each further one runs the trainer once more for its tokens/s and peak memory per rank",
    )
    args = parser.parse_args()
    for key, value in MODEL_DEFAULTS[args.model].items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    return args


def fortune_texts(limit: int) -> list[str]:
    texts: list[str] = []
    for name in ("computers", "science", "linux", "people", "work"):
        path = Path("/usr/share/games/fortunes") / name
        if path.is_file():
            texts += [t.strip() for t in path.read_text(errors="replace").split("\n%\n") if t.strip()]
    return texts[:limit]


def trainer_config(args: argparse.Namespace, endpoint: str, zero: int = 2) -> Any:
    from kubetune.api import TrainerConfig

    dataset: dict[str, Any] = {
        "train": f"s3://{BUCKET}/data/train.jsonl",
        "format": "completion",
        "endpoint": endpoint,
        "preprocessing": {"maxSeqLength": args.seq},
    }
    if args.eval_every:
        dataset["validationSplit"] = 0.05
    return TrainerConfig.model_validate(
        {
            "job": {"name": "bench", "namespace": "bench"},
            "spec": {
                "model": {"uri": f"s3://{BUCKET}/model"},
                "dataset": dataset,
                "training": {
                    "method": "full",
                    "maxSteps": args.steps,
                    "perDeviceBatchSize": args.batch,
                    "learningRate": 1e-3,
                    "evalIntervalSteps": args.eval_every or 10**6,
                    "maxEvalBatches": 2,
                    "checkpoint": {"intervalSteps": args.checkpoint_every or 10**6, "keep": 1},
                    "deepspeed": {"zeroStage": zero},
                },
                "resources": {"workers": args.workers, "gpusPerWorker": 0},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "deploy": {"enabled": False},
            },
            "runUri": f"s3://{BUCKET}/runs/bench/bench-zero{zero}",  # a run of its own per stage (no resume)
            "reporting": {"kubernetes": False, "minIntervalSeconds": 10},
        }
    )


def run_bare(
    tag: str, args: argparse.Namespace, model_dir: Path, shards: list[str], env: dict[str, str], tmpdir: Path
) -> dict[str, float]:
    import socket

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmpdir / f"bare-{tag}.json"
    bare_args = {"model_dir": str(model_dir), "steps": args.steps, "batch": args.batch, "lr": 1e-3, "threads": 1}
    mp.start_processes(
        bare_worker,
        args=(args.workers, port, bare_args, shards, env, str(out)),
        nprocs=args.workers,
        start_method="spawn",
    )
    r = rates(json.loads(out.read_text()))
    print(
        f"bare PyTorch ({tag}; DDP, gloo, {args.workers} procs): median {r['median']:.0f} tokens/s, "
        f"mean {r['mean']:.0f}, per CPU-second {r['cpu']:.0f}",
        flush=True,
    )
    return r


def print_trainer_breakdown(metrics: list[dict[str, Any]], wall: float) -> None:
    """Time to first step by phase, and the trainer's wall time by phase (share of the whole job)."""
    startup = next((m for m in metrics if m.get("event") == "startup"), {})
    parts = [
        f"{k[: -len('Seconds')]} {startup[k]:.1f}s" for k in STARTUP_KEYS if isinstance(startup.get(k), (int, float))
    ]
    print("time to first step: " + (", ".join(parts) or "not reported"), flush=True)
    finished = next((m for m in metrics if m.get("event") == "finished"), {})
    phases = dict(finished.get("phaseSeconds") or {})
    before = startup.get("timeToFirstStepSeconds", 0.0) - startup.get("firstStepSeconds", 0.0)
    phases = {"start-up (before the first step)": before, **phases}
    accounted = sum(phases.values())
    phases["rest (reports, Ray shutdown, driver)"] = max(0.0, wall - accounted)
    for name, seconds in phases.items():
        print(f"trainer wall time, {name}: {seconds:.1f}s = {100 * seconds / wall:.1f}% of {wall:.0f}s", flush=True)


def bench_env(s3: Any, tmp: str, threads: int) -> dict[str, str]:
    tmpdir = Path(tmp)
    return {
        **s3.env(),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
        "TOKENIZERS_PARALLELISM": "false",
        "HF_HUB_OFFLINE": "1",
        "RAY_USAGE_STATS_ENABLED": "0",
        "RAY_AUTH_MODE": "disabled",
        "KUBETUNE_MODEL_CACHE": str(tmpdir / "cache"),
        "KUBETUNE_RAY_STORAGE": str(tmpdir / "ray"),
        "KUBETUNE_STAGING_DIR": tmp,
    }


def seed_inputs(args: argparse.Namespace, client: Any, tmpdir: Path) -> Path:
    """The model and the training text in S3; returns the model's local folder (the bare loop loads it)."""
    from kubetune_cli.localenv.models import convert_smollm2, tiny_llama, upload_dir

    if args.model == "smollm2":
        model_dir = convert_smollm2()
    else:
        model_dir = tiny_llama(tmpdir / "model", hidden=args.hidden, layers=args.layers, seed=0)
    upload_dir(client, model_dir, f"s3://{BUCKET}/model")
    texts = fortune_texts(args.records)
    client.put_object(
        Bucket=BUCKET, Key="data/train.jsonl", Body="\n".join(json.dumps({"text": t}) for t in texts).encode()
    )
    return model_dir


def measure_data(args: argparse.Namespace, cfg: Any, client: Any) -> tuple[Any, float, int]:
    """The data pipeline, timed on its own (the trainer reuses what it wrote): (prepared, seconds, records)."""
    from kubetune_cli.localenv.models import smollm2_tokenizer
    from kubetune_trainer.data import prepare

    t0 = time.perf_counter()
    prepared = prepare(cfg, smollm2_tokenizer(), args.workers, client=client)
    seconds = time.perf_counter() - t0
    records = prepared.stats.get("records") or args.records
    print(
        f"data: {records} records -> {prepared.num_train_sequences} sequences of {prepared.seq_length} "
        f"tokens in {seconds:.1f}s = {records / seconds:.0f} records/s",
        flush=True,
    )
    rows_needed = args.steps * args.batch
    if prepared.num_train_sequences // args.workers < rows_needed:
        print(
            f"note: {prepared.num_train_sequences // args.workers} rows per worker for {rows_needed} needed; "
            "the bare loop wraps around, the trainer starts a new epoch",
            flush=True,
        )
    return prepared, seconds, records


def measure_trainer(cfg: Any, env: dict[str, str], tmpdir: Path, client: Any, tag: str) -> dict[str, Any] | None:
    """The kubetune trainer as the RayJob runs it: its metrics lines, wall time and rates (None if it failed)."""
    config_path = tmpdir / f"config-{tag}.json"
    config_path.write_text(json.dumps(cfg.wire()))
    t0 = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config_path), "--local"],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        timeout=3600,
    )
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(proc.stdout[-5000:])
        return None
    bucket, key = f"{cfg.run_uri}/metrics.jsonl"[len("s3://") :].split("/", 1)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    metrics = [json.loads(line) for line in body.splitlines()]
    steps = {m["step"]: m for m in metrics if "stepSeconds" in m}
    ordered = [steps[k] for k in sorted(steps)]
    r = rates({key: [m[key] for m in ordered] for key in ("stepTokens", "stepSeconds", "stepCpuSeconds")})
    return {"metrics": metrics, "wall": wall, "rates": r, "stepSeconds": [m["stepSeconds"] for m in ordered]}


def print_trainer(run: dict[str, Any], args: argparse.Namespace, zero: int, breakdown: bool) -> None:
    r, wall = run["rates"], run["wall"]
    print(
        f"kubetune trainer (Ray Train + DeepSpeed ZeRO-{zero}, {args.workers} workers): median "
        f"{r['median']:.0f} tokens/s, mean {r['mean']:.0f}, per CPU-second {r['cpu']:.0f} "
        f"(whole job {wall:.0f}s wall)",
        flush=True,
    )
    finished: dict[str, Any] = next((m for m in run["metrics"] if m.get("event") == "finished"), {})
    peaks = finished.get("peakMemoryMB") or []
    print(
        f"peak memory per rank, {args.model} ZeRO-{zero} {args.workers} workers: "
        + (", ".join(f"rank {i} {mb:.0f} MB" for i, mb in enumerate(peaks)) or "not reported"),
        flush=True,
    )
    if not breakdown:
        return
    print("trainer step seconds: " + " ".join(f"{s:.3f}" for s in run["stepSeconds"]), flush=True)
    print_trainer_breakdown(run["metrics"], wall)
    uploads = [m for m in run["metrics"] if m.get("event") == "checkpoint"]
    print(
        f"checkpoints: {len(uploads)}; training thread {sum(m.get('seconds') or 0 for m in uploads):.1f}s "
        f"(local write, waits), background upload {sum(m.get('uploadSeconds') or 0 for m in uploads):.1f}s",
        flush=True,
    )


def print_ratios(
    args: argparse.Namespace,
    trainer: dict[str, float],
    bare_before: dict[str, float],
    bare_after: dict[str, float],
    data: tuple[Any, float, int],
) -> None:
    bare = {k: (bare_before[k] + bare_after[k]) / 2 for k in bare_before}
    drift = abs(bare_before["median"] - bare_after["median"]) / bare["median"]
    print(
        f"background drift between the two bare runs: {drift * 100:.1f}%"
        + (
            "  <- the machine's load changed: trust the CPU-time ratio, or rerun on an idle machine"
            if drift > 0.1
            else ""
        )
    )
    prepared, prepare_seconds, records = data
    tokens_per_record = (prepared.stats.get("tokens") or 1) / max(1, prepared.stats.get("trainRecords") or records)
    consumed = trainer["median"] / tokens_per_record
    print(
        f"ratio {args.model} kubetune/bare tokens/s, median step: {trainer['median'] / bare['median']:.3f} "
        f"(target: {TARGET})"
    )
    print(f"ratio {args.model} kubetune/bare tokens/s, mean: {trainer['mean'] / bare['mean']:.3f} (target: {TARGET})")
    print(
        f"ratio {args.model} kubetune/bare tokens/s per CPU-second, median: {trainer['cpu'] / bare['cpu']:.3f} "
        f"(target: {TARGET}; insensitive to other processes' load, blind to time spent waiting)"
    )
    print(
        f"ratio data pipeline records/s / trainer consumption: {records / prepare_seconds / consumed:.1f} (target: 1.0)"
    )


def main() -> int:
    args = parse_args()
    threads = 1  # what Ray gives a 0.5-CPU worker (OMP_NUM_THREADS=1); the bare loop gets the same
    stages = [int(z) for z in args.zero_stages.split(",")]

    from kubetune_cli.localenv.s3_server import S3Server

    print(
        f"machine: {os.cpu_count()} CPUs, load average {os.getloadavg()[0]:.2f} at the start; model {args.model}, "
        f"{args.workers} workers, {args.steps} steps of {args.batch} x {args.seq} tokens per worker",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp, S3Server(buckets=[BUCKET]) as s3:
        tmpdir = Path(tmp)
        env = bench_env(s3, tmp, threads)
        os.environ.update(env)
        client = s3.client()
        model_dir = seed_inputs(args, client, tmpdir)
        cfg = trainer_config(args, s3.endpoint_url, zero=stages[0])
        data = measure_data(args, cfg, client)
        shards = data[0].train_shards
        # The bare loop runs before and after the trainer (its compared ZeRO stage, the first one).
        bare_before = run_bare("before", args, model_dir, shards, env, tmpdir)
        run = measure_trainer(cfg, env, tmpdir, client, f"zero{stages[0]}")
        if run is None:
            return 1
        print_trainer(run, args, stages[0], breakdown=True)
        bare_after = run_bare("after", args, model_dir, shards, env, tmpdir)
        # Other ZeRO stages: the trainer alone, for its throughput and peak memory per rank.
        for zero in stages[1:]:
            other = measure_trainer(
                trainer_config(args, s3.endpoint_url, zero=zero), env, tmpdir, client, f"zero{zero}"
            )
            if other is None:
                return 1
            print_trainer(other, args, zero, breakdown=False)
        print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")
        print_ratios(args, run["rates"], bare_before, bare_after, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
