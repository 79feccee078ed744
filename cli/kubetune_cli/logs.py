"""`kubetune logs NAME`: the trainer's output (the RayJob entrypoint), or the inference server's.

Where the logs are: a `kubetune dev` cluster keeps them in its state folder (jobs/<namespace>/<rayjob>/
attempt-<n>/driver.log, serving/<namespace>/<deployment>/<pod>/vllm.log); `kubetune run` in
<out>/<name>/attempt/driver.log and <out>/<name>/vllm.log (`--run-dir`). On a real cluster use
`kubectl logs` on the RayJob's submitter pod and the Deployment.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from kubetune_cli.errors import EXIT_USAGE, CLIError


def register(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("logs", help="show a job's trainer (or inference server) log", description=__doc__)
    p.add_argument("name", help="FineTuneJob name")
    p.add_argument("-n", "--namespace", default="default", help="namespace (default: default)")
    p.add_argument("--serving", action="store_true", help="the inference server's log instead of the trainer's")
    p.add_argument("--run-dir", type=Path, help="a `kubetune run` output folder (default: the dev cluster's)")
    p.add_argument("--dir", type=Path, help="the dev cluster's state folder")
    p.add_argument("-f", "--follow", action="store_true", help="keep printing what is appended")
    p.add_argument("--tail", type=int, default=0, help="only the last N lines")
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
        raise CLIError(f"no {'serving' if args.serving else 'trainer'} log for {args.namespace}/{args.name} here",
                       EXIT_USAGE)
    return max(candidates, key=lambda p: p.stat().st_mtime)


def run(args: argparse.Namespace) -> int:
    path = find_log(args)
    with open(path, "rb") as f:
        data = f.read().decode("utf-8", "replace")
        lines = data.splitlines(keepends=True)
        sys.stdout.write("".join(lines[-args.tail:] if args.tail else lines))
        sys.stdout.flush()
        while args.follow:
            chunk = f.read()
            if chunk:
                sys.stdout.write(chunk.decode("utf-8", "replace"))
                sys.stdout.flush()
            else:
                time.sleep(0.5)
    return 0
