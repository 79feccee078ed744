"""`kubetune logs NAME`: the trainer's output (the RayJob entrypoint), or the inference server's.

Where the logs are: a `kubetune dev` cluster keeps them in its state folder (jobs/<namespace>/<rayjob>/
attempt-<n>/driver.log, serving/<namespace>/<deployment>/<pod>/vllm.log); `kubetune run` in
<out>/<name>/attempt/driver.log and <out>/<name>/vllm.log (`--run-dir`). On a real cluster use
`kubectl logs` on the RayJob's submitter pod and the Deployment while they run.

Which inference server: the job's own Deployment, or, for a job with `spec.deploy.server`, the shared
multi-LoRA server's Deployment (named after the server; kubetune_operator.builders.shared_server), whose log
holds the requests of every job on it; the command says which server it shows. The pods shown are those of
the Deployment's current pod template (an older template's pods are replaced ones); with more than one, each
log is headed by its pod's name.

After the run, wherever it ran: the trainer's driver log is kept in S3 under the run's prefix
(<run>/history/<attempt>/driver.log, written by `kubetune.runlog`, the RayJob entrypoint's wrapper), so it
outlives the RayCluster. Without a local log, or with `--history`, it is read from there (the latest
attempt; S3 keys from the job's credentials Secret, read with your own rights, else the environment).
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune_cli.errors import EXIT_ENVIRONMENT, EXIT_USAGE, CLIError


def register(sub: argparse._SubParsersAction[argparse.ArgumentParser]) -> None:
    p = sub.add_parser("logs", help="show a job's trainer (or inference server) log", description=__doc__)
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    p.add_argument("--serving", action="store_true", help="the inference server's log instead of the trainer's")
    p.add_argument("--run-dir", type=Path, help="a `kubetune run` output folder (default: the dev cluster's)")
    p.add_argument("--dir", type=Path, help="the dev cluster's state folder")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines")
    p.add_argument(
        "--history",
        action="store_true",
        help="the driver log kept in S3 (after the RayCluster is gone), not a local one",
    )
    p.set_defaults(func=run)


@dataclass(frozen=True)
class ServingTarget:
    """The Deployment that serves a job, as far as the cluster tells."""

    deployment: str
    server: str | None = None  # the shared inference server (spec.deploy.server), if the job is served on one
    model: str | None = None  # the job's OpenAI model name on it (status.endpoint.model)
    revision: str | None = None  # the current pod template's ReplicaSet name: its pods' names start with it


def serving_target(name: str, namespace: str) -> ServingTarget:
    """The job's shared server's Deployment (spec.deploy.server) or its own. Without a cluster to ask, or once
    the job is gone, the job's own Deployment, by the operator's naming: its logs may well still be here."""
    from kubetune_cli import cluster
    from kubetune_cli.localenv.kubelet import replica_set_name
    from kubetune_operator import names

    try:
        with cluster.connect() as conn:
            job = conn.get_job(name, namespace)
            server = ((job.get("spec") or {}).get("deploy") or {}).get("server")
            deployment = server or names.inference(name)
            dep = conn.get(f"/apis/apps/v1/namespaces/{namespace}/deployments/{deployment}")
    except CLIError:
        return ServingTarget(names.inference(name))
    model = ((job.get("status") or {}).get("endpoint") or {}).get("model")
    return ServingTarget(deployment, server, model, replica_set_name(dep) if dep else None)


def serving_logs(root: Path, namespace: str, target: ServingTarget) -> list[Path]:
    """The server container's logs of the target's current pods (the dev kubelet keeps each pod's in
    serving/<namespace>/<deployment>/<pod>/); without a current one, the newest pod's."""
    from kubetune_operator.builders.inference import SERVER_CONTAINER

    logs = sorted((root / "serving" / namespace / target.deployment).glob(f"*/{SERVER_CONTAINER}.log"))
    current = [p for p in logs if target.revision and p.parent.name.startswith(f"{target.revision}-")]
    return current or ([max(logs, key=lambda p: p.stat().st_mtime)] if logs else [])


def find_serving_logs(args: argparse.Namespace) -> list[Path]:
    """The inference server's logs in the dev cluster's state folder, one per current pod; for a job on a shared
    server, says so on stderr (its log holds every job's requests)."""
    from kubetune_cli.localenv import devenv

    target = serving_target(args.name, args.namespace)
    found = serving_logs(devenv.DevEnv(args.dir or devenv.default_dir()).dir, args.namespace, target)
    what = f"shared inference server {target.server}" if target.server else "serving"
    if not found:
        raise CLIError(
            f"no {what} log for {args.namespace}/{args.name} here (on a cluster of your own: "
            f"kubectl logs -n {args.namespace} deploy/{target.deployment})",
            EXIT_USAGE,
        )
    if target.server:
        model = f" as model {target.model}" if target.model else ""
        sys.stderr.write(
            f"({args.namespace}/{args.name} is served{model} on the shared inference server {target.server}: "
            f"the log of Deployment {target.deployment}, with every job's requests on it)\n"
        )
    return found


def find_logs(args: argparse.Namespace) -> list[Path]:
    """The log files to show: the trainer's driver log, or one per current pod of the inference server."""
    if args.serving and not args.run_dir:
        return find_serving_logs(args)
    if args.run_dir:
        path = args.run_dir / ("vllm.log" if args.serving else "attempt/driver.log")
        found = [path] if path.is_file() else []
    else:
        from kubetune_cli.localenv import devenv
        from kubetune_operator import names

        root = devenv.DevEnv(args.dir or devenv.default_dir()).dir
        drivers = list((root / "jobs" / args.namespace / names.ray_job(args.name)).glob("attempt-*/driver.log"))
        found = [max(drivers, key=lambda p: p.stat().st_mtime)] if drivers else []
    if not found:
        what = "serving" if args.serving else "trainer"
        raise CLIError(f"no {what} log for {args.namespace}/{args.name} here", EXIT_USAGE)
    return found


def latest_history(conn: Any, job: dict[str, Any]) -> tuple[str, str, dict[str, Any] | None] | None:
    """(attempt folder URI, driver log, exit record) of the job's latest attempt kept in S3, or None."""
    from kubetune import runlog, s3

    client = conn.s3_client(job)
    base = f"{conn.run_uri(job)}/{runlog.HISTORY}"
    try:
        keys = s3.list_keys(client, base)
    except Exception as e:  # noqa: BLE001 - botocore's errors; say which prefix could not be read
        raise CLIError(f"cannot list {base}: {type(e).__name__}", EXIT_ENVIRONMENT) from None
    attempts = sorted({k["rel"].split("/", 1)[0] for k in keys if k["rel"].endswith("/" + runlog.LOG_NAME)})
    if not attempts:
        return None
    folder = f"{base}/{attempts[-1]}"
    text = (s3.get_bytes(client, f"{folder}/{runlog.LOG_NAME}") or b"").decode("utf-8", "replace")
    return folder, text, s3.get_json(client, f"{folder}/{runlog.EXIT_NAME}")


def _print_history(args: argparse.Namespace) -> int:
    from kubetune_cli import cluster

    with cluster.connect() as conn:
        job = conn.get_job(args.name, args.namespace)
        found = latest_history(conn, job)
    if found is None:
        raise CLIError(
            f"no trainer log for {args.namespace}/{args.name}: none here, and none kept in S3 under "
            f"{conn.run_uri(job)}/history/ (the run has not ended yet?)",
            EXIT_USAGE,
        )
    folder, text, record = found
    lines = text.splitlines(keepends=True)
    sys.stdout.write("".join(lines[-args.tail :] if args.tail else lines))
    exit_code = (record or {}).get("exitCode")
    sys.stderr.write(f"(kept in {folder}; driver exit code {exit_code})\n")
    return 0


def _print_logs(paths: list[Path], tail: int, follow: bool) -> None:
    """Each file (its last `tail` lines), headed by its pod's folder name when there are several; with
    `follow`, whatever is appended to any of them, headed again when the file changes."""
    headed = len(paths) > 1
    with contextlib.ExitStack() as stack:
        files = [stack.enter_context(open(p, "rb")) for p in paths]
        for path, f in zip(paths, files):
            if headed:
                sys.stdout.write(f"==> pod {path.parent.name} <==\n")
            lines = f.read().decode("utf-8", "replace").splitlines(keepends=True)
            sys.stdout.write("".join(lines[-tail:] if tail else lines))
        sys.stdout.flush()
        last = paths[-1]
        while follow:
            appended = False
            for path, f in zip(paths, files):
                chunk = f.read()
                if not chunk:
                    continue
                if headed and path != last:
                    sys.stdout.write(f"==> pod {path.parent.name} <==\n")
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
                appended, last = True, path
            if not appended:
                time.sleep(0.5)


def run(args: argparse.Namespace) -> int:
    if args.history and not args.serving:
        return _print_history(args)
    try:
        paths = find_logs(args)
    except CLIError:
        if args.serving or args.run_dir:
            raise
        return _print_history(args)
    _print_logs(paths, args.tail, args.follow)
    return 0
