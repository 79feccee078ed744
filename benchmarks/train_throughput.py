"""Training throughput: the kubetune trainer against a bare PyTorch loop, same model, data and machine, one run.

    .venv/bin/python benchmarks/train_throughput.py [--hidden 128 --layers 2 --seq 64 --batch 4 --steps 40]

What is compared. Both sides train the same tiny Llama (SmolLM2 tokenizer, random weights) on the same
prepared rows (Debian fortunes, tokenised and packed once by the trainer's own `prepare`), in the same order
(`batch_indices`), with the same number of processes, each limited to the same number of threads:

- kubetune: `python -m kubetune_trainer --local`, i.e. Ray Train workers running DeepSpeed ZeRO-2 with the
  per-step loss all-reduce, the status/metrics reporter thread, checkpoint and export at the end;
- bare: `torch.multiprocessing` processes, gloo DistributedDataParallel, torch AdamW, the same warmup+cosine
  schedule and gradient clipping: the loop one would write by hand.

Tokens/s is measured the same way on both sides, per optimizer step: real (non-padding) tokens of all workers
divided by the step's time (forward, backward, optimizer; for the trainer also its per-step loss all-reduce and
bookkeeping), as recorded by rank 0. The headline is the median over steps after the first WARMUP_STEPS, which
resists the bursts of other work on a shared machine; the plain mean (all tokens / all step time) is printed
beside it. The bare loop runs before and after the trainer (the two medians are averaged), so a change of
background load during the run shows up as a difference between the two bare figures instead of as a bias.
Start-up (Ray, DeepSpeed init, model download) and the end (checkpoint, export) are not in these figures;
the trainer's wall time is printed separately, because it is a fixed cost per job, not a per-token one.

Also printed: the data pipeline's rate (records/s through `prepare`: read, clean, dedup, tokenise, pack,
shard to S3) against the rate at which the trainer consumes records.

On a shared machine the numbers move with other load: run it on an otherwise idle machine, and more than
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


def bare_worker(rank: int, world: int, port: int, args: dict[str, Any], shards: list[str], env: dict[str, str],
                out: str) -> None:
    """One process of the bare loop (DDP over gloo)."""
    os.environ.update(env)
    import numpy as np
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
    sched = get_scheduler("cosine", opt, num_warmup_steps=math.ceil(0.03 * args["steps"]),
                          num_training_steps=args["steps"])
    data = load_shard([shards[rank]])
    batches = batch_indices(len(data["input_ids"]), args["batch"], 0, 42)
    durations, cpu_durations, step_tokens = [], [], []
    for step in range(args["steps"]):
        rows = batches[step % len(batches)]
        t0, cpu0 = time.perf_counter(), time.process_time()
        out_ = ddp(input_ids=torch.from_numpy(data["input_ids"][rows]).long(),
                   position_ids=torch.from_numpy(data["position_ids"][rows]).long(),
                   labels=torch.from_numpy(data["labels"][rows]).long())
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
        Path(out).write_text(json.dumps({"stepTokens": tokens.tolist(), "stepSeconds": durations,
                                         "stepCpuSeconds": cpu_durations}))
    # No destroy_process_group(): with gloo it can wait forever for a peer that has already exited.


WARMUP_STEPS = 3


def rates(steps: dict[str, list[float]]) -> dict[str, float]:
    """Median tokens/s over the steps after warm-up (by wall time and by rank 0's CPU time) and the mean."""
    import statistics

    tokens, wall, cpu = steps["stepTokens"], steps["stepSeconds"], steps["stepCpuSeconds"]
    return {
        "median": statistics.median([t / s for t, s in zip(tokens, wall)][WARMUP_STEPS:]),
        "cpu": statistics.median([t / s for t, s in zip(tokens, cpu)][WARMUP_STEPS:]),
        "mean": sum(tokens) / sum(wall),
    }


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--hidden", type=int, default=128)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seq", type=int, default=64)
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--records", type=int, default=1000)
    args = parser.parse_args()
    threads = 1  # what Ray gives a 0.5-CPU worker (OMP_NUM_THREADS=1); the bare loop gets the same

    from kubetune.api import TrainerConfig
    from kubetune_cli.localenv.models import smollm2_tokenizer, tiny_llama, upload_dir
    from kubetune_cli.localenv.s3_server import S3Server
    from kubetune_trainer.data import prepare

    texts = []
    for name in ("computers", "science", "linux", "people", "work"):
        path = Path("/usr/share/games/fortunes") / name
        if path.is_file():
            texts += [t.strip() for t in path.read_text(errors="replace").split("\n%\n") if t.strip()]
    texts = texts[: args.records]

    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp, S3Server(buckets=[BUCKET]) as s3:
        tmpdir = Path(tmp)
        env = {**s3.env(), "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
               "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "RAY_USAGE_STATS_ENABLED": "0",
               "RAY_AUTH_MODE": "disabled", "KUBETUNE_MODEL_CACHE": str(tmpdir / "cache"),
               "KUBETUNE_RAY_STORAGE": str(tmpdir / "ray"), "KUBETUNE_STAGING_DIR": tmp}
        os.environ.update(env)
        client = s3.client()
        model_dir = tiny_llama(tmpdir / "model", hidden=args.hidden, layers=args.layers, seed=0)
        upload_dir(client, model_dir, f"s3://{BUCKET}/model")
        client.put_object(Bucket=BUCKET, Key="data/train.jsonl",
                          Body="\n".join(json.dumps({"text": t}) for t in texts).encode())
        cfg = TrainerConfig.model_validate({
            "job": {"name": "bench", "namespace": "bench"},
            "spec": {
                "model": {"uri": f"s3://{BUCKET}/model"},
                "dataset": {"train": f"s3://{BUCKET}/data/train.jsonl", "format": "completion",
                            "endpoint": s3.endpoint_url, "preprocessing": {"maxSeqLength": args.seq}},
                "training": {"method": "full", "maxSteps": args.steps, "perDeviceBatchSize": args.batch,
                             "learningRate": 1e-3, "evalIntervalSteps": 10**6,
                             "checkpoint": {"intervalSteps": 10**6}, "deepspeed": {"zeroStage": 2}},
                "resources": {"workers": args.workers, "gpusPerWorker": 0},
                "output": {"uri": f"s3://{BUCKET}/runs"}, "deploy": {"enabled": False},
            },
            "runUri": f"s3://{BUCKET}/runs/bench/bench",
            "reporting": {"kubernetes": False, "minIntervalSeconds": 10},
        })

        # 1. The data pipeline, timed on its own (the trainer below reuses what it wrote).
        t0 = time.perf_counter()
        prepared = prepare(cfg, smollm2_tokenizer(), args.workers, client=client)
        prepare_seconds = time.perf_counter() - t0
        records = prepared.stats.get("records") or len(texts)
        print(f"data: {records} records -> {prepared.num_train_sequences} sequences of {prepared.seq_length} "
              f"tokens in {prepare_seconds:.1f}s = {records / prepare_seconds:.0f} records/s", flush=True)
        rows_needed = args.steps * args.batch
        if prepared.num_train_sequences // args.workers < rows_needed:
            print(f"note: {prepared.num_train_sequences // args.workers} rows per worker for {rows_needed} needed; "
                  "the bare loop wraps around, the trainer starts a new epoch", flush=True)

        # 2. The bare PyTorch loop, before and after the trainer.
        import socket

        import torch.multiprocessing as mp

        bare_args = {"model_dir": str(model_dir), "steps": args.steps, "batch": args.batch, "lr": 1e-3,
                     "threads": threads}

        def run_bare(tag: str) -> dict[str, float]:
            with socket.socket() as sock:
                sock.bind(("127.0.0.1", 0))
                port = sock.getsockname()[1]
            out = tmpdir / f"bare-{tag}.json"
            mp.start_processes(bare_worker, args=(args.workers, port, bare_args, prepared.train_shards, env,
                                                  str(out)), nprocs=args.workers, start_method="spawn")
            r = rates(json.loads(out.read_text()))
            print(f"bare PyTorch ({tag}; DDP, gloo, {args.workers} procs): median {r['median']:.0f} tokens/s, "
                  f"mean {r['mean']:.0f}, per CPU-second {r['cpu']:.0f}", flush=True)
            return r

        bare_before = run_bare("before")

        # 3. The kubetune trainer, as the RayJob runs it.
        config_path = tmpdir / "config.json"
        config_path.write_text(json.dumps(cfg.wire()))
        t0 = time.perf_counter()
        proc = subprocess.run([sys.executable, "-m", "kubetune_trainer", "--config", str(config_path), "--local"],
                              env={**os.environ, **env}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                              text=True, timeout=1800)
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            print(proc.stdout[-5000:])
            return 1
        body = client.get_object(Bucket=BUCKET, Key="runs/bench/bench/metrics.jsonl")["Body"].read().decode()
        steps = {m["step"]: m for m in map(json.loads, body.splitlines()) if "stepSeconds" in m}
        ordered = [steps[k] for k in sorted(steps)]
        trainer = rates({key: [m[key] for m in ordered] for key in ("stepTokens", "stepSeconds", "stepCpuSeconds")})
        print(f"kubetune trainer (Ray Train + DeepSpeed ZeRO-2, {args.workers} workers): median "
              f"{trainer['median']:.0f} tokens/s, mean {trainer['mean']:.0f}, per CPU-second {trainer['cpu']:.0f} "
              f"(whole job {wall:.0f}s wall, including Ray start, setup, checkpoint and export)", flush=True)

        bare_after = run_bare("after")
        bare = {k: (bare_before[k] + bare_after[k]) / 2 for k in bare_before}
        drift = abs(bare_before["median"] - bare_after["median"]) / bare["median"]
        ratio = trainer["median"] / bare["median"]
        print(f"ratio kubetune/bare (median step, wall): {ratio:.3f} ({(ratio - 1) * 100:+.1f}%; target: within 10%)")
        print(f"ratio kubetune/bare (mean, wall):        {trainer['mean'] / bare['mean']:.3f}")
        print(f"ratio kubetune/bare (median, CPU time):  {trainer['cpu'] / bare['cpu']:.3f}  (insensitive to other "
              "processes' load, blind to time spent waiting)")
        print(f"background drift between the two bare runs: {drift * 100:.1f}%"
              + ("  <- the machine's load changed: trust the CPU-time ratio, or rerun on an idle machine"
                 if drift > 0.1 else ""))

        tokens_per_record = (prepared.stats.get("tokens") or 1) / max(1, prepared.stats.get("trainRecords") or records)
        consumed = trainer["median"] / tokens_per_record
        print(f"data pipeline: {records / prepare_seconds:.0f} records/s vs trainer consumption "
              f"{consumed:.0f} records/s ({records / prepare_seconds / consumed:.1f}x headroom)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
