"""`kubetune logs NAME`: the trainer's output (the RayJob entrypoint), or the inference server's.

Where the logs are: a `kubetune dev` cluster keeps them in its state folder (jobs/<namespace>/<rayjob>/
attempt-<n>/driver.log, serving/<namespace>/<deployment>/<pod>/vllm.log); `kubetune run` in
<out>/<name>/attempt/driver.log and <out>/<name>/vllm.log (`--run-dir`). On a real cluster use
`kubectl logs` on the RayJob's submitter pod and the Deployment while they run.

After the run, wherever it ran: the trainer's driver log is kept in S3 under the run's prefix
(<run>/history/<attempt>/driver.log, written by `kubetune.runlog`, the RayJob entrypoint's wrapper), so it
outlives the RayCluster. Without a local log, or with `--history`, it is read from there (the latest
attempt; S3 keys from the job's credentials Secret, read with your own rights, else the environment).
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path
from typing import Any, cast

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


def find_log(args: argparse.Namespace) -> Path:
    if args.run_dir:
        path = args.run_dir / ("vllm.log" if args.serving else "attempt/driver.log")
        candidates = [path] if path.is_file() else []
    else:
        from kubetune_cli.localenv import devenv

        root = devenv.DevEnv(args.dir or devenv.default_dir()).dir
        from kubetune_operator import names

        if args.serving:
            candidates = list((root / "serving" / args.namespace / names.inference(args.name)).glob("*/vllm.log"))
        else:
            candidates = list((root / "jobs" / args.namespace / names.ray_job(args.name)).glob("attempt-*/driver.log"))
    if not candidates:
        raise CLIError(
            f"no {'serving' if args.serving else 'trainer'} log for {args.namespace}/{args.name} here", EXIT_USAGE
        )
    return cast(Path, max(candidates, key=lambda p: p.stat().st_mtime))


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


def run(args: argparse.Namespace) -> int:
    if args.history and not args.serving:
        return _print_history(args)
    try:
        path = find_log(args)
    except CLIError:
        if args.serving or args.run_dir:
            raise
        return _print_history(args)
    with open(path, "rb") as f:
        data = f.read().decode("utf-8", "replace")
        lines = data.splitlines(keepends=True)
        sys.stdout.write("".join(lines[-args.tail :] if args.tail else lines))
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.5)
    return 0
