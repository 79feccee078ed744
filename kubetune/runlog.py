"""Keeping a training driver's log after its Ray cluster is gone: the RayJob's entrypoint runs the trainer
under this wrapper, which passes the trainer's output through unchanged (Ray and KubeRay still capture it)
and, when the trainer ends however it ends (success, exception, killed, SIGTERM), copies it to S3 under the
run's prefix:

    <runUri>/history/<UTC start time>-<random>/driver.log   the driver's stdout and stderr
    <runUri>/history/<UTC start time>-<random>/exit.json    {exitCode, startTime, endTime, signal}

`kubetune logs NAME` and `kubetune status NAME` read them once the RayCluster (and its logs) are gone. Each
attempt writes a folder of its own, so a retry never overwrites an earlier attempt's history.

Why here and not in the operator: the driver already holds the job's S3 credentials (from the job's Secret,
by reference); the operator holds none, and giving it every job's Secret would widen what it can read. The
wrapper is the trainer's parent, so a trainer that crashes or is killed still gets its log written.

    python -m kubetune.runlog --config /etc/kubetune/config.json -- python -m kubetune_trainer --config ...

Uploading is best effort: a failure is reported on stderr and never changes the trainer's exit code. Only the
trainer's output is stored: no environment, no config.
"""

from __future__ import annotations

import argparse
import json
import os
import secrets
import signal
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from typing import Any

HISTORY = "history"
LOG_NAME = "driver.log"
EXIT_NAME = "exit.json"


def _now() -> str:
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def attempt_folder(run_uri: str, started: datetime) -> str:
    """`<run>/history/<20260102T030405.123456Z>-<6 hex>`: sorts by start time, unique per attempt. Microseconds,
    because a driver that fails at once and its retry can start within the same second (the random suffix alone
    would then order them by chance)."""
    return f"{run_uri.rstrip('/')}/{HISTORY}/{started.strftime('%Y%m%dT%H%M%S.%fZ')}-{secrets.token_hex(3)}"


def _target(config_path: str) -> dict[str, Any] | None:
    """Where to write (run URI, S3 endpoint and region) from the trainer config; None when unreadable."""
    try:
        with open(config_path, encoding="utf-8") as f:
            cfg = json.load(f)
        dataset = cfg["spec"]["dataset"]
        return {"run": cfg["runUri"], "endpoint": dataset.get("endpoint"), "region": dataset.get("region")}
    except (OSError, ValueError, KeyError, TypeError) as e:
        print(
            f"kubetune.runlog: no history will be written (config {config_path}: {type(e).__name__})", file=sys.stderr
        )
        return None


def run(command: list[str], log: Any) -> tuple[int, int | None]:
    """Run `command`, teeing its output to stdout and `log`; (exit code, signal forwarded to it or None)."""
    child = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.STDOUT)
    received: list[int] = []

    def forward(signum: int, _frame: Any) -> None:  # KubeRay stopping the job: let the trainer end itself
        received.append(signum)
        child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    stream = child.stdout
    assert stream is not None
    out = sys.stdout.buffer
    for chunk in iter(stream.readline, b""):
        out.write(chunk)
        out.flush()
        log.write(chunk)
    rc = child.wait()
    return (128 - rc if rc < 0 else rc), (received[0] if received else None)


def upload(target: dict[str, Any], folder: str, log_path: str, record: dict[str, Any]) -> None:
    from kubetune import s3

    client = s3.make_client(target.get("endpoint"), region=target.get("region"))
    with open(log_path, "rb") as f:
        s3.put_bytes(client, f"{folder}/{LOG_NAME}", f.read(), content_type="text/plain; charset=utf-8")
    s3.put_json(client, f"{folder}/{EXIT_NAME}", record)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m kubetune.runlog", description=__doc__.split("\n\n")[0])
    p.add_argument("--config", required=True, help="the trainer config (JSON) naming runUri and the S3 endpoint")
    p.add_argument("command", nargs=argparse.REMAINDER, help="-- then the trainer's command line")
    args = p.parse_args(argv)
    command = args.command[1:] if args.command[:1] == ["--"] else args.command
    if not command:
        p.error("no command after --")
    target = _target(args.config)
    started = datetime.now(UTC)
    start_text, t0 = _now(), time.monotonic()
    with tempfile.NamedTemporaryFile(prefix="kubetune-driver-", suffix=".log", delete=False) as log:
        rc, sig = run(command, log)
    try:
        if target is not None:
            folder = attempt_folder(target["run"], started)
            record = {
                "exitCode": rc,
                "startTime": start_text,
                "endTime": _now(),
                "seconds": round(time.monotonic() - t0, 1),
                "signal": sig,
            }
            upload(target, folder, log.name, record)
            print(f"kubetune.runlog: driver log kept at {folder}/{LOG_NAME}", file=sys.stderr)
    except Exception as e:  # noqa: BLE001 - history is best effort; the run's own result stands
        print(f"kubetune.runlog: could not write the history ({type(e).__name__}: {e})", file=sys.stderr)
    finally:
        os.unlink(log.name)
    return rc


if __name__ == "__main__":
    sys.exit(main())
