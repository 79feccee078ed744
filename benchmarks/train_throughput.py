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
- bare DDP: `torch.multiprocessing` processes, gloo DistributedDataParallel, torch AdamW, the same
  warmup+cosine schedule and gradient clipping: the loop one would write by hand;
- bare DeepSpeed: the same processes running `deepspeed.initialize` with the DeepSpeed config the trainer
  builds (`kubetune_trainer.deepspeed_config`, ZeRO-2 on CPU/gloo) and the trainer's learning-rate schedule:
  what DeepSpeed alone costs, without Ray Train, reporting or sync steps.

Against bare DDP the ratios hold kubetune's own overhead and what ZeRO costs against DDP together; against bare
DeepSpeed (`ratio train_tokens_per_s_vs_bare_deepspeed_*`) only kubetune's own overhead; and
`ratio bare_deepspeed_vs_bare_ddp_*` is what ZeRO costs, kubetune aside. The bare loops also print their median
milliseconds by phase (forward, backward, optimizer step) and their loss curves (the mean loss of the ranks per
step), so that a DeepSpeed setting that changes the math shows as a loss difference.

Tokens/s is measured the same way on both sides, per optimizer step: real (non-padding) tokens of all workers
divided by the step's time (forward, backward, optimizer; for the trainer also the sync and reporting work,
counted into the steps it follows), as recorded by rank 0. The headline is the median over steps after the
first WARMUP_STEPS, which resists the bursts of other work on a shared machine; the plain mean (all tokens /
all step time, warm-up included) is the second ratio. Both bare loops run before and after the trainer (each
pair is averaged), so a change of background load during the run shows up as a difference between the two
figures of a bare loop instead of as a bias.

`--bare-only` runs no trainer: the bare DDP loop, then the bare DeepSpeed loop once per `--ds-variant NAME=JSON`
(settings merged into the trainer's `zero_optimization`), interleaved, `--repeat` rounds, each variant's ratio
with DDP and its loss curve's largest difference from DDP's: how DeepSpeed settings were compared, e.g.

    .venv/bin/python benchmarks/train_throughput.py --bare-only --repeat 2 --ds-variant 'config={}' \
        --ds-variant 'overlap={"overlap_comm": true}'

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


class StepRecord:
    """A bare loop's per-step figures on each rank: wall and CPU time, time by phase, real tokens, loss."""

    def __init__(self) -> None:
        self.seconds: list[float] = []
        self.cpu_seconds: list[float] = []
        self.tokens: list[int] = []
        self.losses: list[float] = []
        self.phases: dict[str, list[float]] = {}
        self._t0 = self._cpu0 = self._mark = 0.0

    def start(self) -> None:
        self._t0 = self._mark = time.perf_counter()
        self._cpu0 = time.process_time()

    def phase(self, name: str) -> None:
        now = time.perf_counter()
        self.phases.setdefault(name, []).append(now - self._mark)
        self._mark = now

    def end(self, loss: Any, tokens: int) -> None:
        self.seconds.append(time.perf_counter() - self._t0)
        self.cpu_seconds.append(time.process_time() - self._cpu0)
        self.tokens.append(tokens)
        self.losses.append(float(loss.detach()))  # after the step's time: the loss's host sync is not counted

    def write(self, rank: int, out: str) -> None:
        """The tokens of all workers and their mean loss in each step; rank 0's times (the ranks are in
        lockstep), as the trainer reports them."""
        import torch
        import torch.distributed as dist

        tokens = torch.tensor(self.tokens, dtype=torch.float64)
        losses = torch.tensor(self.losses, dtype=torch.float64)
        dist.all_reduce(tokens)
        dist.all_reduce(losses)
        if rank == 0:
            figures = {"stepTokens": tokens.tolist(), "stepSeconds": self.seconds, "stepCpuSeconds": self.cpu_seconds}
            figures |= {"stepLoss": (losses / dist.get_world_size()).tolist(), "phaseSeconds": self.phases}
            Path(out).write_text(json.dumps(figures))


def _batch(data: dict[str, Any], rows: Any) -> dict[str, Any]:
    """The model's inputs for these rows of a loaded shard (both bare loops feed the model the same way)."""
    import torch

    return {k: torch.from_numpy(data[k][rows]).long() for k in ("input_ids", "position_ids", "labels")}


def _model_and_batches(args: dict[str, Any], shards: list[str], rank: int) -> tuple[Any, dict[str, Any], list[Any]]:
    """What both bare loops start from: the model (same seed, training mode, no KV cache), this rank's shard
    and its batches in the trainer's order (batch_indices of epoch 0, seed 42)."""
    import torch
    from transformers import AutoModelForCausalLM

    from kubetune_trainer.data import batch_indices, load_shard

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_pretrained(args["model_dir"], dtype=torch.float32)
    model.config.use_cache = False
    model.train()
    data = load_shard([shards[rank]])
    return model, data, batch_indices(len(data["input_ids"]), args["batch"], 0, 42)


def bare_worker(
    rank: int, world: int, port: int, args: dict[str, Any], shards: list[str], env: dict[str, str], out: str
) -> None:
    """One process of the bare loop (DDP over gloo)."""
    os.environ.update(env)
    import torch
    import torch.distributed as dist
    from torch.nn.parallel import DistributedDataParallel
    from transformers import get_scheduler

    torch.set_num_threads(args["threads"])
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    model, data, batches = _model_and_batches(args, shards, rank)
    ddp = DistributedDataParallel(model)
    opt = torch.optim.AdamW(model.parameters(), lr=args["lr"], betas=(0.9, 0.999), eps=1e-8, weight_decay=0.0)
    sched = get_scheduler(
        "cosine", opt, num_warmup_steps=math.ceil(0.03 * args["steps"]), num_training_steps=args["steps"]
    )
    record = StepRecord()
    for step in range(args["steps"]):
        rows = batches[step % len(batches)]
        record.start()
        out_ = ddp(**_batch(data, rows))
        record.phase("forward")
        out_.loss.backward()  # DDP's bucketed all-reduce runs on gloo's threads, overlapped with this
        record.phase("backward")
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        record.phase("step")
        record.end(out_.loss, int(data["attention_mask"][rows].sum()))
    record.write(rank, out)
    # No destroy_process_group(): with gloo it can wait forever for a peer that has already exited.


def bare_deepspeed_worker(
    rank: int,
    world: int,
    port: int,
    args: dict[str, Any],
    shards: list[str],
    env: dict[str, str],
    out: str,
) -> None:
    """One process of the bare DeepSpeed loop: deepspeed.initialize with the trainer's own DeepSpeed config
    (kubetune_trainer.deepspeed_config, plus args["zero"] merged into zero_optimization when exploring) and
    its learning-rate schedule, over gloo; no Ray, no reporting, no sync steps."""
    os.environ.update(env)
    os.environ.update(
        {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(world)}
        | {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
    )
    import torch
    import torch.distributed as dist

    from kubetune_trainer.deepspeed_config import deepspeed_config
    from kubetune_trainer.train import _import_deepspeed, _lr_schedule

    torch.set_num_threads(args["threads"])
    deepspeed = _import_deepspeed(False)  # as the trainer imports it on CPU (no shared-memory op to build)
    dist.init_process_group("gloo", init_method="env://", rank=rank, world_size=world)  # as Ray Train does
    deepspeed.init_distributed(dist_backend="gloo")
    training = args["training"]
    ds_config = deepspeed_config(training, world_size=world, use_gpu=False)
    ds_config["zero_optimization"].update(args["zero"])
    model, data, batches = _model_and_batches(args, shards, rank)
    engine, _, _, _ = deepspeed.initialize(
        model=model,
        model_parameters=list(model.parameters()),
        config=ds_config,
        lr_scheduler=lambda optimizer: _lr_schedule(optimizer, training, args["steps"]),
    )
    record = StepRecord()
    for step in range(args["steps"]):
        rows = batches[step % len(batches)]
        record.start()
        loss = engine(**_batch(data, rows)).loss
        record.phase("forward")
        engine.backward(loss)
        record.phase("backward")
        engine.step()
        record.phase("step")
        record.end(loss, int(data["attention_mask"][rows].sum()))
    record.write(rank, out)


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


def ds_variant(text: str) -> tuple[str, dict[str, Any]]:
    name, _, settings = text.partition("=")
    return name, json.loads(settings or "{}")


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
    parser.add_argument(
        "--bare-only",
        action="store_true",
        help="no trainer: the bare DDP loop and the bare DeepSpeed loop (each --ds-variant), interleaved, --repeat "
        "times, to compare DeepSpeed settings quickly",
    )
    parser.add_argument(
        "--ds-variant",
        action="append",
        type=ds_variant,
        metavar="NAME=JSON",
        help="with --bare-only: settings merged into the trainer's zero_optimization for one bare DeepSpeed run, "
        "e.g. small='{\"reduce_bucket_size\": 5e6}' (repeatable; default: the trainer's config as it is)",
    )
    parser.add_argument("--repeat", type=int, default=2, help="with --bare-only: rounds of all loops")
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


BARE_KINDS = {"ddp": "bare PyTorch (DDP, gloo)", "deepspeed": "bare DeepSpeed (the trainer's config, gloo)"}


def run_bare(
    kind: str,
    tag: str,
    args: argparse.Namespace,
    model_dir: Path,
    shards: list[str],
    env: dict[str, str],
    tmpdir: Path,
    training: Any = None,
    zero: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """One bare loop (kind ddp or deepspeed; `training` and `zero` for deepspeed): its rates, step losses and
    median seconds by phase."""
    import socket
    import statistics

    import torch.multiprocessing as mp

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    out = tmpdir / f"bare-{kind}-{tag}.json"
    bare_args = {"model_dir": str(model_dir), "steps": args.steps, "batch": args.batch, "lr": 1e-3, "threads": 1}
    if kind == "deepspeed":
        bare_args |= {"training": training, "zero": zero or {}}
    mp.start_processes(
        bare_worker if kind == "ddp" else bare_deepspeed_worker,
        args=(args.workers, port, bare_args, shards, env, str(out)),
        nprocs=args.workers,
        start_method="spawn",
    )
    figures = json.loads(out.read_text())
    r: dict[str, Any] = {**rates(figures), "loss": figures["stepLoss"]}
    r["phases"] = {k: statistics.median(v[WARMUP_STEPS:]) for k, v in figures["phaseSeconds"].items()}
    phases = ", ".join(f"{k} {v * 1000:.0f}" for k, v in r["phases"].items())
    print(
        f"{BARE_KINDS[kind]} ({tag}, {args.workers} procs): median {r['median']:.0f} tokens/s, "
        f"mean {r['mean']:.0f}, per CPU-second {r['cpu']:.0f}; median ms by phase: {phases}; "
        f"loss first {r['loss'][0]:.4f} last {r['loss'][-1]:.4f}",
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


def average(runs: list[dict[str, Any]]) -> dict[str, float]:
    """The mean of bare runs' rates, and how far the first and the last of them drifted apart (share)."""
    mean = {k: sum(r[k] for r in runs) / len(runs) for k in ("median", "mean", "cpu")}
    return {**mean, "drift": abs(runs[0]["median"] - runs[-1]["median"]) / mean["median"]}


def loss_gap(a: list[float], b: list[float]) -> float:
    """The largest difference between two loss curves, step by step."""
    return max(abs(x - y) for x, y in zip(a, b))


def print_ratios(
    args: argparse.Namespace,
    trainer: dict[str, float],
    bare_ddp: list[dict[str, Any]],
    bare_ds: list[dict[str, Any]],
    data: tuple[Any, float, int],
) -> None:
    ddp, ds = average(bare_ddp), average(bare_ds)
    for name, bare in (("DDP", ddp), ("DeepSpeed", ds)):
        print(
            f"background drift between the two bare {name} runs: {bare['drift'] * 100:.1f}%"
            + (
                "  <- the machine's load changed: trust the CPU-time ratio, or rerun on an idle machine"
                if bare["drift"] > 0.1
                else ""
            )
        )
    print(
        f"loss curves, largest step-by-step difference: bare DeepSpeed vs bare DDP "
        f"{loss_gap(bare_ds[0]['loss'], bare_ddp[0]['loss']):.2e}, bare DeepSpeed before vs after "
        f"{loss_gap(bare_ds[0]['loss'], bare_ds[-1]['loss']):.2e}"
    )
    prepared, prepare_seconds, records = data
    tokens_per_record = (prepared.stats.get("tokens") or 1) / max(1, prepared.stats.get("trainRecords") or records)
    consumed = trainer["median"] / tokens_per_record
    # Against the bare DDP loop: kubetune's own overhead and what ZeRO costs against DDP, together.
    print(
        f"ratio {args.model} kubetune/bare tokens/s, median step: {trainer['median'] / ddp['median']:.3f} "
        f"(target: {TARGET})"
    )
    print(f"ratio {args.model} kubetune/bare tokens/s, mean: {trainer['mean'] / ddp['mean']:.3f} (target: {TARGET})")
    print(
        f"ratio {args.model} kubetune/bare tokens/s per CPU-second, median: {trainer['cpu'] / ddp['cpu']:.3f} "
        f"(target: {TARGET}; insensitive to other processes' load, blind to time spent waiting)"
    )
    # Against the bare DeepSpeed loop (the same DeepSpeed config): kubetune's own overhead only.
    print(
        f"ratio train_tokens_per_s_vs_bare_deepspeed_median: {trainer['median'] / ds['median']:.3f} (target: {TARGET})"
    )
    print(f"ratio train_tokens_per_s_vs_bare_deepspeed_mean: {trainer['mean'] / ds['mean']:.3f} (target: {TARGET})")
    print(
        f"ratio train_tokens_per_s_per_cpu_second_vs_bare_deepspeed_median: {trainer['cpu'] / ds['cpu']:.3f} "
        f"(target: {TARGET})"
    )
    # What DeepSpeed (ZeRO) costs against DDP on this machine, kubetune aside.
    print(
        f"ratio bare_deepspeed_vs_bare_ddp_tokens_per_s_median: {ds['median'] / ddp['median']:.3f} "
        "(target: none, shown)"
    )
    print(
        f"ratio data pipeline records/s / trainer consumption: {records / prepare_seconds / consumed:.1f} (target: 1.0)"
    )


def compare_bare(
    args: argparse.Namespace, model_dir: Path, shards: list[str], env: dict[str, str], tmpdir: Path, training: Any
) -> None:
    """--bare-only: the bare DDP loop and the bare DeepSpeed loop with each --ds-variant, interleaved, --repeat
    times; per variant its rates, its ratio with DDP and its loss curve's largest difference from DDP's."""
    variants = dict(args.ds_variant or [("config", {})])
    runs: dict[str, list[dict[str, Any]]] = {"ddp": [], **{name: [] for name in variants}}
    for rep in range(args.repeat):
        runs["ddp"].append(run_bare("ddp", f"round {rep + 1}", args, model_dir, shards, env, tmpdir))
        for name, zero in variants.items():
            tag = f"{name} {json.dumps(zero)}, round {rep + 1}"
            runs[name].append(run_bare("deepspeed", tag, args, model_dir, shards, env, tmpdir, training, zero))
    print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")
    ddp = average(runs["ddp"])
    for name, of_variant in runs.items():
        r = average(of_variant)
        medians = " / ".join(f"{x['median']:.0f}" for x in of_variant)
        print(
            f"{name}: median tokens/s per round {medians}; vs bare DDP median {r['median'] / ddp['median']:.3f}, "
            f"mean {r['mean'] / ddp['mean']:.3f}, per CPU-second {r['cpu'] / ddp['cpu']:.3f}; largest loss "
            f"difference from DDP {max(loss_gap(x['loss'], runs['ddp'][0]['loss']) for x in of_variant):.2e}",
            flush=True,
        )


def main() -> int:
    args = parse_args()
    threads = 1  # what Ray gives a 0.5-CPU worker (OMP_NUM_THREADS=1); the bare loops get the same
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
        shards, training = data[0].train_shards, cfg.spec.training
        if args.bare_only:
            compare_bare(args, model_dir, shards, env, tmpdir, training)
            return 0
        # Both bare loops run before and after the trainer (its compared ZeRO stage, the first one).
        bare_ddp = [run_bare("ddp", "before", args, model_dir, shards, env, tmpdir)]
        bare_ds = [run_bare("deepspeed", "before", args, model_dir, shards, env, tmpdir, training)]
        run = measure_trainer(cfg, env, tmpdir, client, f"zero{stages[0]}")
        if run is None:
            return 1
        print_trainer(run, args, stages[0], breakdown=True)
        bare_ddp.append(run_bare("ddp", "after", args, model_dir, shards, env, tmpdir))
        bare_ds.append(run_bare("deepspeed", "after", args, model_dir, shards, env, tmpdir, training))
        # Other ZeRO stages: the trainer alone, for its throughput and peak memory per rank.
        for zero in stages[1:]:
            other = measure_trainer(
                trainer_config(args, s3.endpoint_url, zero=zero), env, tmpdir, client, f"zero{zero}"
            )
            if other is None:
                return 1
            print_trainer(other, args, zero, breakdown=False)
        print(f"machine load average at the end: {os.getloadavg()[0]:.2f}")
        print_ratios(args, run["rates"], bare_ddp, bare_ds, data)
    return 0


if __name__ == "__main__":
    sys.exit(main())
