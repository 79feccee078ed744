"""`kubetune run [MANIFEST]`: run a FineTuneJob on this machine with the same trainer the cluster runs.

    kubetune run                          # examples/quickstart.yaml
    kubetune run my-job.yaml --no-serve

What happens, in order (each step's time is printed at the end and kept in runs/<name>/summary.json):
1. The manifest is checked with the cluster's own checks; a bad one fails at once, naming each field.
2. S3: the manifest's endpoint, or kubetune's embedded SeaweedFS when it is a loopback address where nothing
   answers (kubetune_cli.localenv.s3endpoint); built-in models and datasets it names under s3://kubetune-samples/
   are uploaded there (kubetune_cli.localenv.builtin).
3. The operator's own builders make the ConfigMap and the RayJob; the RayJob runs here
   (kubetune_cli.localenv.rayjob_local): a local Ray cluster sized like its RayCluster, the entrypoint
   `python -m kubetune_trainer --config <the ConfigMap's config.json>` with the job's S3 keys in its
   environment. Progress comes from the trainer's reports (progress bars).
4. Results: the evaluation, the loss curves (runs/<name>/loss.png, also uploaded next to the metrics).
5. Serving: vLLM's OpenAI server on 127.0.0.1 with the result, a sample question from the held-out data,
   and how to query it; it keeps serving until Ctrl-C (unless --no-serve or --exit-after-query).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import shutil
import signal
import time
import uuid
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune_cli import manifest
from kubetune_cli.errors import EXIT_ENVIRONMENT, EXIT_FAILED, EXIT_USAGE, CLIError

DEFAULT_MANIFEST = "examples/quickstart.yaml"
POLL_S = 0.5


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser(
        "run",
        help="run a FineTuneJob on this machine (train, evaluate, serve)",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "manifest", nargs="?", default=DEFAULT_MANIFEST, help=f"FineTuneJob YAML (default {DEFAULT_MANIFEST})"
    )
    p.add_argument("--out", default="runs", help="local folder for outputs: <out>/<name>/ (default ./runs)")
    p.add_argument("--no-serve", action="store_true", help="stop after training and evaluation")
    p.add_argument("--exit-after-query", action="store_true", help="serve, answer the sample question, then exit")
    p.add_argument("--port", type=int, help="port of the OpenAI-compatible server (default: a free one)")
    p.add_argument("--max-tokens", type=int, default=64, help="tokens of the sample answers (default 64)")
    p.add_argument(
        "--resume",
        action="store_true",
        help="continue the previous run of this job from its checkpoint (default: a new run, with a "
        "new uid and so its own S3 prefix; earlier runs are left as they are)",
    )
    p.set_defaults(func=run)


class Timings:
    def __init__(self) -> None:
        self.phases: list[tuple[str, float]] = []
        self.t0 = time.monotonic()

    @contextlib.contextmanager
    def phase(self, name: str) -> Iterator[None]:
        t = time.monotonic()
        try:
            yield
        finally:
            self.phases.append((name, time.monotonic() - t))

    def total(self) -> float:
        return time.monotonic() - self.t0


def run(args: argparse.Namespace) -> int:
    m = manifest.load(args.manifest)  # fails in well under a second, before anything starts
    _check_runs_here(m.spec)
    if not args.no_serve:
        from kubetune_cli.run_serve import check_serving_venv

        check_serving_venv()  # before the training, not after it
    from rich.console import Console

    console = Console(soft_wrap=True)  # long lines (commands to copy) must not be broken
    run_dir = Path(args.out) / m.name
    run_dir.mkdir(parents=True, exist_ok=True)
    timings = Timings()
    summary: dict[str, Any] = {"job": m.name, "namespace": m.namespace, "manifest": str(m.path)}
    console.print(f"[bold]kubetune run[/] {m.namespace}/{m.name} from {m.path}; outputs in {run_dir}/")

    from kubetune_cli.localenv import s3endpoint

    with contextlib.ExitStack() as stack:
        _stop_on_sigterm()
        with timings.phase("s3"):
            try:
                s3 = s3endpoint.resolve(m.spec.dataset.endpoint, m.spec.dataset.region)
            except s3endpoint.S3EndpointError as e:
                raise CLIError(str(e), EXIT_ENVIRONMENT) from None
            stack.callback(s3.close)
            console.print(f"S3: {s3.description}")
        client = s3.client()
        with timings.phase("seed"):
            _seed(console, s3, client, m.spec)
        cfg = _trainer_config(m, _run_uid(run_dir, args.resume))
        summary["runUri"] = cfg.run_uri
        with timings.phase("train"):
            status = _train(console, m, cfg, s3, run_dir, summary)
        with timings.phase("report"):
            _report(console, cfg, client, run_dir, status, summary)
        if not args.no_serve:
            _serve(console, stack, cfg, client, run_dir, status, args, timings, summary)
        summary["timings"] = {name: round(sec, 1) for name, sec in timings.phases}
        summary["totalSeconds"] = round(timings.total(), 1)
        (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
        console.print(
            "times: " + ", ".join(f"{n} {_mmss(s)}" for n, s in timings.phases) + f"; total {_mmss(timings.total())}"
        )
        if summary.get("served") and not args.exit_after_query:
            console.print("[bold]serving until Ctrl-C[/]")
            with contextlib.suppress(KeyboardInterrupt):
                while True:
                    time.sleep(1)
    return 0


# ------------------------------------------------------------------------------------------------ steps


def _check_runs_here(spec: api.FineTuneJobSpec) -> None:
    if spec.resources.gpus_per_worker > 0 and not Path("/dev/nvidia0").exists():
        raise CLIError(
            f"spec.resources.gpusPerWorker: {spec.resources.gpus_per_worker} GPU(s) per worker, but "
            "this machine has none; set it to 0 to train on the CPU",
            EXIT_USAGE,
        )
    if spec.model.uri.startswith("hf://"):
        raise CLIError(
            "spec.model.uri: hf:// models need the Hugging Face hub; use an s3:// copy (or the "
            "built-in s3://kubetune-samples/models/smollm2-135m-instruct)",
            EXIT_USAGE,
        )
    cpus = spec.resources.workers * max(1, math.floor(_cpu(spec.resources.cpu_per_worker)))
    if cpus > (os.cpu_count() or 1) * 2:
        raise CLIError(
            f"spec.resources asks for {cpus} CPUs ({spec.resources.workers} workers x "
            f"{spec.resources.cpu_per_worker}); this machine has {os.cpu_count()}: lower "
            "spec.resources.cpuPerWorker or workers for a local run",
            EXIT_USAGE,
        )


def _cpu(q: str) -> float:
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def _seed(console: Any, s3: Any, client: Any, spec: api.FineTuneJobSpec) -> None:
    from kubetune_cli.localenv import builtin

    try:
        items = builtin.referenced(builtin.spec_uris(spec))
    except ValueError as e:
        raise CLIError(str(e), EXIT_USAGE) from None
    if not s3.kubetune_owned:
        # Someone else's S3 is never written to by kubetune itself: built-ins must be there already.
        missing = [i for i in items if not builtin.is_present(client, i)]
        if missing:
            raise CLIError(
                f"{missing[0].uri} is a kubetune built-in, uploaded only into kubetune's local S3; "
                f"{s3.description} does not have it",
                EXIT_USAGE,
            )
        return
    for uri in (spec.output.uri, *spec.dataset.train_uris(), spec.model.uri):
        builtin.ensure_bucket(client, uri[len("s3://") :].split("/", 1)[0])
    builtin.seed(client, items, say=lambda msg: console.print(f"  {msg}"))


def _run_uid(run_dir: Path, resume: bool) -> str:
    """The uid of this run: the previous run's with --resume, else a fresh one (kept in <run_dir>/run-uid).

    Like a FineTuneJob's metadata.uid it names the run's own S3 prefix (<output>/<namespace>/<name>/<uid>), so
    a new run trains from step 0 without deleting or touching any earlier run's checkpoints or model."""
    path = run_dir / "run-uid"
    if resume:
        if not path.is_file():
            raise CLIError(f"--resume: no earlier run of this job in {run_dir}", EXIT_USAGE)
        return path.read_text().strip()
    uid = str(uuid.uuid4())
    path.write_text(uid + "\n")
    return uid


def _trainer_config(m: manifest.Manifest, uid: str) -> api.TrainerConfig:
    cfg = api.resolve_trainer_config(m.name, m.namespace, uid, m.spec)
    cfg.reporting.kubernetes = False  # no API server: progress goes to the local progress file
    return cfg


def _train(
    console: Any, m: manifest.Manifest, cfg: api.TrainerConfig, s3: Any, run_dir: Path, summary: dict[str, Any]
) -> dict[str, Any]:
    """Build the RayJob as the operator would, run it here, follow the trainer's reports."""
    from kubetune_cli.localenv import kuberay
    from kubetune_cli.localenv.binaries import cache_dir
    from kubetune_cli.localenv.rayjob_local import LocalRayJobRun
    from kubetune_cli.progress_view import FileFollower
    from kubetune_operator import builders
    from kubetune_operator.meta import Owner
    from kubetune_operator.settings import Settings

    owner = Owner(m.name, m.namespace, cfg.job.uid or "")
    config_map = builders.config_map(owner, m.spec)
    config_map["data"][builders.config.CONFIG_KEY] = json.dumps(cfg.wire(), indent=2, sort_keys=True) + "\n"
    ray_job = builders.ray_job(owner, m.spec, Settings(), spec_hash="local")
    (run_dir / "config.json").write_text(config_map["data"][builders.config.CONFIG_KEY])
    progress_file = run_dir / "progress.jsonl"
    progress_file.unlink(missing_ok=True)
    secret = m.spec.dataset.credentials_secret
    for old in [run_dir / "attempt", *run_dir.glob("attempt-*")]:
        shutil.rmtree(old, ignore_errors=True)  # this run's attempts only: their logs describe this run

    def attempt(n: int) -> LocalRayJobRun:
        return LocalRayJobRun(
            ray_job,
            run_dir / f"attempt-{n}",
            config_maps=lambda name: config_map["data"] if name == config_map["metadata"]["name"] else None,
            secrets=lambda name: s3.credentials if name == secret else None,
            extra_env={
                **s3.env(),  # also when the manifest names no Secret: the local stand-in for the pod's keys
                "KUBETUNE_PROGRESS_FILE": str(progress_file.resolve()),
                "KUBETUNE_MODEL_CACHE": str(cache_dir() / "node-model-cache"),
                "KUBETUNE_RAY_STORAGE": str((run_dir / "ray-results").resolve()),
            },
        )

    # KubeRay's state machine decides what happens after each attempt: done, or (within spec.backoffLimit) a new
    # attempt on a fresh Ray cluster, which resumes from the newest complete checkpoint.
    state = kuberay.OfflineRayJob(ray_job)
    n, follower = 0, FileFollower(progress_file)
    while True:
        n += 1
        job = attempt(n)
        rc, started, view = _run_attempt(console, m, job, ray_job, follower, n)
        message = job.message()
        jds = state.attempt_ended(rc == 0, message, started, datetime.now(UTC))
        if jds != "Retrying":
            break
        console.print(
            f"[yellow]attempt {n} failed[/] (exit {rc}: {message}); spec.backoffLimit "
            f"{m.spec.backoff_limit}: a new attempt on a fresh local Ray cluster, from the latest checkpoint"
        )
        state.retry()
    summary["trainer"] = {
        "exitCode": rc,
        "message": message,
        "log": str(job.driver_log),
        "attempts": n,
        "failedAttempts": state.status.get("failed", 0),
    }
    if rc != 0:
        tail = "\n".join(job.driver_log.read_text(errors="replace").splitlines()[-15:])
        raise CLIError(
            f"training failed (exit {rc}, attempt {n} of {m.spec.backoff_limit + 1}): {message}\n"
            f"--- last lines of {job.driver_log} ---\n{tail}",
            EXIT_FAILED,
        )
    console.print(f"[green]trained[/]: {message}")
    if view is not None and view.status.get("startup"):  # the last attempt's time to first step, by phase
        summary["startup"] = {
            "rayClusterStartSeconds": view.before_trainer.get("Ray cluster start"),
            **view.status["startup"],
        }
    return view.status if view is not None else {}


def _run_attempt(
    console: Any, m: manifest.Manifest, job: Any, ray_job: dict[str, Any], follower: Any, n: int
) -> tuple[int, datetime, Any]:
    """One attempt: a fresh local Ray cluster, the entrypoint, the progress view until it exits."""
    from kubetune_cli.localenv.pod_sandbox import PodConfigError
    from kubetune_cli.localenv.raycluster import RayClusterError
    from kubetune_cli.progress_view import TrainingView

    view = None
    try:
        console.print(
            f"Ray: a local cluster with {job.cpus} CPU(s) for {m.spec.resources.workers} worker(s)"
            + (f" (attempt {n})" if n > 1 else "")
        )
        t_cluster = time.monotonic()
        try:
            job.start_cluster()
        except (RayClusterError, PodConfigError) as e:
            raise CLIError(
                f"the local Ray cluster did not start (log {job.ray_log}): {str(e)[-1500:]}", EXIT_ENVIRONMENT
            ) from None
        started = datetime.now(UTC)
        cluster_seconds = round(time.monotonic() - t_cluster, 1)
        job.submit()
        console.print(f"trainer: {ray_job['spec']['entrypoint']}  (log: {job.driver_log})")
        # The time to first step it prints starts with this cluster's start (the trainer only connects to it).
        view = TrainingView(console, m.name, before_trainer={"Ray cluster start": cluster_seconds})
        while (rc := job.poll()) is None:
            view.update(follower.read())
            time.sleep(POLL_S)
        view.update(follower.read())
    finally:
        if view is not None:
            view.stop()
        job.stop()
    return rc, started, view


def _report(
    console: Any, cfg: api.TrainerConfig, client: Any, run_dir: Path, status: dict[str, Any], summary: dict[str, Any]
) -> None:
    from kubetune.fetch import parse_s3_uri
    from kubetune_cli.plot import loss_series, parse_metrics, plot_losses

    bucket, key = parse_s3_uri(cfg.metrics_uri)
    text = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    (run_dir / "metrics.jsonl").write_text(text)
    metrics = parse_metrics(text)
    train, evals = loss_series(metrics)
    evaluation = status.get("evaluation") or {}
    base = evaluation.get("base")
    if base is not None:
        console.print(
            f"held-out {evaluation.get('metric', 'evalLoss')}: base model {base:.4f} -> fine-tuned "
            f"{evaluation.get('fineTuned'):.4f}"
        )
    elif evals:
        (s0, v0), (s1, v1) = evals[0], evals[-1]
        console.print(
            f"held-out loss: {v0:.4f} at step {s0} -> {v1:.4f} at step {s1} "
            "(the trainer does not report the base model's loss yet)"
        )
    else:
        console.print("no held-out evaluation (the manifest has no validation data)")
    summary["evaluation"] = evaluation or ({"first": evals[0], "final": evals[-1]} if evals else None)
    summary["trainLoss"] = {"first": train[0], "final": train[-1]} if train else None
    summary["model"] = status.get("model")
    png = plot_losses(metrics, run_dir / "loss.png", f"{cfg.job.namespace}/{cfg.job.name}", baseline=base)
    bucket, key = parse_s3_uri(f"{cfg.run_uri}/loss.png")
    client.upload_file(str(png), bucket, key, ExtraArgs={"ContentType": "image/png"})
    console.print(f"loss curves: {png} (and s3://{bucket}/{key})")


def _serve(
    console: Any,
    stack: contextlib.ExitStack,
    cfg: api.TrainerConfig,
    client: Any,
    run_dir: Path,
    status: dict[str, Any],
    args: argparse.Namespace,
    timings: Timings,
    summary: dict[str, Any],
) -> None:
    from kubetune_cli import query, run_serve

    model = status.get("model")
    if not model:
        raise CLIError("the trainer reported no exported model; nothing to serve")
    if not cfg.spec.deploy.enabled:
        console.print("spec.deploy.enabled is false: not serving")
        return
    with timings.phase("serve"):
        console.print("serving: starting vLLM's OpenAI-compatible server on 127.0.0.1 (1-2 minutes on a CPU)")
        served = run_serve.start(cfg, model, client, run_dir, port=args.port)
        stack.callback(served.server.stop)
    summary["served"] = {"url": served.server.api_base, "model": served.model, "base": served.base}
    console.print(
        f"[green]serving[/] {served.model} at {served.server.api_base} (ready in "
        f"{served.server.ready_seconds:.0f} s; log {run_dir / 'vllm.log'})"
    )
    record = query.first_record(client, cfg.spec.dataset.validation or cfg.spec.dataset.train_uris()[0])
    sample = query.sample_from_record(record, cfg.spec.dataset) if record else None
    if sample is not None:
        with timings.phase("query"):
            # Text from the data and the models is printed literally (no rich markup: "[...]" is common).
            plain = {"markup": False, "highlight": False}
            where = "held out" if cfg.spec.dataset.validation else "from the data"
            console.print(f"\nquestion ({where}): {sample.question}", **plain)
            if sample.reference:
                console.print(f"reference: {sample.reference}", **plain)
            base_answer = None
            if served.base:
                base_answer = query.ask(served.server.api_base, served.base, sample, args.max_tokens)
                console.print(f"base model ({served.base}): {_shown(base_answer)}", **plain)
            answer = query.ask(served.server.api_base, served.model, sample, args.max_tokens)
            console.print(f"fine-tuned ({served.model}): {_shown(answer)}\n", **plain)
        summary["sample"] = {
            "question": sample.question,
            "reference": sample.reference,
            "answer": answer,
            "baseAnswer": base_answer,
        }
    console.print(
        "query it yourself:\n"
        + query.howto(served.server.api_base, served.model, sample.question if sample else "Hello!"),
        markup=False,
        highlight=False,
    )


def _shown(answer: str) -> str:
    return answer.strip() or "(no text: only special tokens or whitespace)"


def _stop_on_sigterm() -> None:
    """SIGTERM ends the run like Ctrl-C, so every server it started is stopped."""

    def handler(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    with contextlib.suppress(ValueError):  # not the main thread (tests calling run() from a thread)
        signal.signal(signal.SIGTERM, handler)


def _mmss(seconds: float) -> str:
    return f"{int(seconds) // 60}:{int(seconds) % 60:02d}"
