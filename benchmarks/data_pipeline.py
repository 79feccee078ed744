"""Data pipeline throughput: records/s of the trainer's `prepare()` in one process and in 1 and 2 Ray workers,
against bare render+tokenise, same data, one run.

    .venv/bin/python benchmarks/data_pipeline.py [--records 20000 --format chat --seq 512 --shards 2]

The dataset: N chat (or instruction) records built from Debian's fortunes (a question that names the
collection and the record's number, the fortune as the answer), written as JSONL to a local SeaweedFS.

What is compared, on the same records and the same tokenizer (SmolLM2's):
- prepare: `kubetune_trainer.data.prepare`, the whole path: stream from S3, parse and validate, normalise,
  exact dedup, split, render with the chat template, tokenise, mask, pack, shuffle into equal Parquet shards,
  upload, write the manifest; in this process (parallelism 0, what a --local run does), then with 1 and 2 Ray
  actors (a local Ray cluster of 2 CPUs; what a RayJob does on its worker pods). Each preparation writes to
  an output location of its own, so none reuses another's cached result. The Ray preparations first start
  their actors (each imports transformers and loads the tokenizer: seconds, once per preparation whatever the
  data's size); the ratios leave that start-up out, taking its seconds from the preparation's own log line;
- bare render+tokenise: what any chat pipeline must do at the least: `apply_chat_template(tokenize=False)` for
  each record and one batched call of the fast tokenizer per 256 records, in memory;
- bare tokenise: the batched tokenizer alone on the pre-rendered texts (the floor);
- bare render+tokenise on one tokenizer thread (in a child process with RAYON_NUM_THREADS=1): the baseline of
  one Ray worker, which reserves one CPU and tokenises on one thread.

Printed: records/s of each, and the ratios `ratio NAME: X (target: Y)`: scaling from 1 to 2 workers, and the
one-process rate against bare render+tokenise. The one-process preparation runs --repeat times (3), each time
followed at once by bare render+tokenise, so that each pair shares the machine's load of the moment; the ratio
is the median of the pairs' ratios (each pair's is printed too). Start-up (S3 server, Ray, tokenizer load,
upload of the raw data) is outside every timing. On a shared machine the numbers move with other load (the
load average is printed): run it more than once before trusting a ratio; 2 workers cannot scale on a machine
whose 2 cores are already busy.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "trainer"))  # runnable from a checkout without installing

BUCKET = "kubetune-bench"
BATCH = 256


def build_records(n: int, fmt: str) -> list[dict]:
    from kubetune_cli.localenv.samples import read_fortunes

    fortunes = [f for fs in read_fortunes().values() for f in fs if len(f.text) <= 500]
    out = []
    for i in range(n):
        f = fortunes[i % len(fortunes)]
        question = f'Tell me fortune number {i} from the "{f.collection}" collection.'
        if fmt == "chat":
            out.append({"messages": [{"role": "user", "content": question}, {"role": "assistant", "content": f.text}]})
        else:
            out.append({"prompt": question, "response": f.text})
    return out


def as_messages(record: dict) -> list[dict]:
    if "messages" in record:
        return record["messages"]
    return [{"role": "user", "content": record["prompt"]}, {"role": "assistant", "content": record["response"]}]


def bare(tokenizer, records: list[dict]) -> tuple[float, float, int]:
    """(seconds render+tokenise, seconds tokenise only, tokens)."""
    backend = tokenizer.backend_tokenizer
    t0 = time.perf_counter()
    texts = [tokenizer.apply_chat_template(as_messages(r), tokenize=False) for r in records]
    tokens = 0
    for i in range(0, len(texts), BATCH):
        tokens += sum(len(e.ids) for e in backend.encode_batch(texts[i : i + BATCH], add_special_tokens=False))
    render_and_tokenize = time.perf_counter() - t0
    t0 = time.perf_counter()
    for i in range(0, len(texts), BATCH):
        backend.encode_batch(texts[i : i + BATCH], add_special_tokens=False)
    tokenize_only = time.perf_counter() - t0
    return render_and_tokenize, tokenize_only, tokens


def bare_one_thread(args: argparse.Namespace) -> float:
    """Seconds of bare render+tokenise with the tokenizer on one thread, as a preparation actor runs it: in a
    child process, since the tokenizer's thread pool is sized once per process."""
    env = {**os.environ, "RAYON_NUM_THREADS": "1"}
    cmd = [sys.executable, __file__, "--bare-only", "--records", str(args.records), "--format", args.format]
    out = subprocess.run(cmd, env=env, check=True, capture_output=True, text=True).stdout
    return float(out.split()[-1])


def _start_ray(s3: object) -> None:
    """A local Ray of 2 CPUs whose workers can read the benchmark's S3 (credentials in their environment)."""
    import ray

    os.environ.pop("RAY_ADDRESS", None)
    os.environ["AWS_ACCESS_KEY_ID"] = s3.access_key  # type: ignore[attr-defined]
    os.environ["AWS_SECRET_ACCESS_KEY"] = s3.secret_key  # type: ignore[attr-defined]
    ray.init(num_cpus=2, include_dashboard=False, logging_level=logging.WARNING)


def _args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--records", type=int, default=20000)
    ap.add_argument("--format", choices=["chat", "instruction"], default="chat")
    ap.add_argument("--seq", type=int, default=512, help="maxSeqLength")
    ap.add_argument("--shards", type=int, default=2, help="training workers (equal shards)")
    ap.add_argument("--repeat", type=int, default=3, help="one-process preparations, each paired with bare")
    ap.add_argument("--bare-only", action="store_true", help=argparse.SUPPRESS)  # bare_one_thread's child
    ap.add_argument("--near-dedup", type=float, default=None, help="also run MinHash near-dedup at this threshold")
    ap.add_argument("--json", action="store_true", help="print one JSON line with the figures at the end")
    return ap.parse_args()


@dataclass
class Measured:
    rates: dict[str, float]  # records/s of each preparation (one process: the median of the repeats)
    per_process: list[float]  # each one-process preparation's rate against bare render+tokenise right after it
    packed_s: dict[str, float]  # seconds of the encode step (render, tokenise, pack) of each preparation
    seconds: dict[str, float]  # seconds of each preparation (one process: the median of the repeats)
    started_s: dict[str, float]  # seconds of each Ray preparation spent starting its actors
    prepared: Any  # the last preparation
    size: int  # bytes of JSONL


class _StepSeconds(logging.Handler):
    """Takes the seconds of two steps from the preparation's own log lines: the encode step (render, tokenise,
    pack: the step whose scaling is the workers' own) and the Ray actors' start-up."""

    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.packed: list[float] = []
        self.started: list[float] = []

    def emit(self, record: logging.LogRecord) -> None:
        msg, args = str(record.msg), record.args
        if not isinstance(args, tuple):
            return
        if msg.startswith("prepare: %d blocks parsed"):
            self.packed.append(cast(float, args[3]))
        elif msg.startswith("preparing the data in %d Ray actors"):
            self.started.append(cast(float, args[1]))


def measure(args: argparse.Namespace, tokenizer: Any, records: list[dict[str, Any]]) -> Measured:
    """Prepare the same records in one process (--repeat times, each followed by bare render+tokenise), then on
    1 and on 2 Ray workers."""
    import ray

    from kubetune.api import parse_spec, resolve_trainer_config
    from kubetune_cli.localenv.s3_server import S3Server
    from kubetune_trainer.data import prepare

    prepare_module: Any = importlib.import_module("kubetune_trainer.data.prepare")
    with tempfile.TemporaryDirectory(prefix="kubetune-bench-") as tmp, S3Server(buckets=[BUCKET]) as s3:
        client = s3.client()
        path = Path(tmp) / "data.jsonl"
        with path.open("w") as f:
            for r in records:
                f.write(json.dumps(r) + "\n")
        client.upload_file(str(path), BUCKET, "raw/data.jsonl")
        size = path.stat().st_size
        preprocessing = {"maxSeqLength": args.seq}
        if args.near_dedup:
            preprocessing["nearDuplicateThreshold"] = args.near_dedup
        spec = {
            "model": {"uri": f"s3://{BUCKET}/model"},
            "dataset": {
                "train": f"s3://{BUCKET}/raw",
                "format": args.format,
                "endpoint": s3.endpoint_url,
                "validationSplit": 0.02,
                "preprocessing": preprocessing,
            },
        }
        prepare_module.PARALLEL_MIN_BYTES = 0  # measure the Ray path whatever the data size
        steps = _StepSeconds()
        data_log = logging.getLogger("kubetune_trainer.data")  # prepare's and the executors' lines
        data_log.addHandler(steps)
        data_log.setLevel(logging.INFO)
        packed_s: dict[str, float] = {}
        started_s: dict[str, float] = {}
        rates: dict[str, float] = {}
        all_seconds: dict[str, float] = {}
        one_process: list[float] = []  # seconds of each one-process preparation
        per_process: list[float] = []  # each one's rate against bare render+tokenise measured right after it
        prepared = None
        runs = [("one process", 0, i) for i in range(args.repeat)] + [("1 worker", 1, 0), ("2 workers", 2, 0)]
        for label, parallelism, i in runs:
            if parallelism and not ray.is_initialized():
                _start_ray(s3)
            # An output location per measurement: no preparation finds another's in the cache.
            out = parse_spec({**spec, "output": {"uri": f"s3://{BUCKET}/out-{parallelism}-{i}"}})
            cfg = resolve_trainer_config("bench", "default", None, out)
            t0 = time.perf_counter()
            prepared = prepare(cfg, tokenizer, args.shards, client=client, parallelism=parallelism)
            seconds = time.perf_counter() - t0
            rates[label] = len(records) / seconds
            all_seconds[label] = seconds
            packed_s[label] = steps.packed[-1]
            if parallelism:
                started_s[label] = steps.started[-1]
            else:
                # Its baseline right after it, so that each pair ran under the same load.
                one_process.append(seconds)
                per_process.append(bare(tokenizer, records)[0] / seconds)
        ray.shutdown()
        data_log.removeHandler(steps)
    all_seconds["one process"] = statistics.median(one_process)
    rates["one process"] = len(records) / all_seconds["one process"]
    return Measured(rates, per_process, packed_s, all_seconds, started_s, prepared, size)


def main() -> int:
    args = _args()
    logging.basicConfig(level=logging.WARNING)
    from kubetune_cli.localenv.models import smollm2_tokenizer

    tokenizer = smollm2_tokenizer()
    records = build_records(args.records, args.format)
    if args.bare_only:
        print(bare(tokenizer, records)[0])
        return 0
    measured = measure(args, tokenizer, records)
    rates, per_process_runs, prepared, size = measured.rates, measured.per_process, measured.prepared, measured.size

    render_s, tokenize_s, bare_tokens = bare(tokenizer, records)
    n = len(records)
    assert prepared is not None
    stats = prepared.stats
    print(f"machine: {os.cpu_count()} cores, load average {' '.join(f'{x:.1f}' for x in os.getloadavg())}")
    print(
        f"dataset: {n} {args.format} records, {size / 1e6:.1f} MB JSONL; prepared {stats['sequences']} "
        f"sequences of {prepared.seq_length} tokens in {args.shards} shards "
        f"({stats['tokens']} train tokens, {stats['duplicatesRemoved']} duplicates, "
        f"{stats['validationRecords']} held out)"
    )
    # The Ray preparations' seconds with the actors' start-up left out (each actor imports transformers and
    # loads the tokenizer, all in parallel, once per preparation): what more data would scale with.
    busy = {k: measured.seconds[k] - started for k, started in measured.started_s.items()}
    for label, rate in rates.items():
        line = f"prepare, {label + ':':<14} {rate:8.0f} records/s"
        if label in busy:
            line += f"  ({n / busy[label]:.0f} after {measured.started_s[label]:.1f} s of actor start-up)"
        print(line)
    print(f"bare render+tokenise:     {n / render_s:8.0f} records/s  ({bare_tokens / render_s:.0f} tokens/s)")
    print(f"bare tokenise only:       {n / tokenize_s:8.0f} records/s")
    scaling = busy["1 worker"] / busy["2 workers"]
    per_process = statistics.median(per_process_runs)
    print(f"ratio prepare_2_workers_vs_1_worker: {scaling:.2f} (target: 1.8; the actors' start-up left out)")
    packed_1, packed_2 = measured.packed_s["1 worker"], measured.packed_s["2 workers"]
    encode_scaling = packed_1 / packed_2
    print(
        f"ratio prepare_encode_step_2_workers_vs_1_worker: {encode_scaling:.2f} (shown; render, tokenise and "
        f"pack alone, the actors' start-up left out: {packed_1:.2f} s / {packed_2:.2f} s)"
    )
    print(
        f"ratio prepare_per_process_vs_bare_render_tokenize: {per_process:.2f} (target: 0.8)  "
        f"[median of {len(per_process_runs)} pairs: {' '.join(f'{x:.2f}' for x in per_process_runs)}]"
    )
    # An actor tokenises on one thread (the CPU it reserves): its baseline is bare on one thread too.
    render_1t = bare_one_thread(args)
    print(f"bare render+tokenise, 1 thread: {n / render_1t:6.0f} records/s")
    print(
        f"ratio prepare_1_worker_vs_bare_render_tokenize_1_thread: {render_1t / busy['1 worker']:.2f} (target: 0.8; "
        f"the actor's start-up left out)"
    )
    print(f"ratio prepare_per_process_vs_bare_tokenize: {rates['one process'] * tokenize_s / n:.2f} (shown)")
    if args.json:
        figures = {
            "records": n,
            "format": args.format,
            "prepare_records_per_s": rates,
            "prepare_records_per_s_after_start_up": {k: n / s for k, s in busy.items()},
            "render_tokenize_records_per_s": n / render_s,
            "tokenize_records_per_s": n / tokenize_s,
            "scaling_2_vs_1": scaling,
            "encode_step_scaling_2_vs_1": encode_scaling,
            "per_process_vs_render_tokenize": per_process,
        }
        print(json.dumps(figures))
    return 0


if __name__ == "__main__":
    sys.exit(main())
