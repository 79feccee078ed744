"""Support for the trainer's fault tests: an S3 server that can be stopped and started again on the same ports
and data, a Ray cluster of the module's own, the trainer driver as a process to act on while it runs, the
Ray Train worker processes of that cluster, and the trace of trained records.

Everything is real (SeaweedFS, Ray, DeepSpeed, the trainer); the faults are caused, not simulated: processes are
killed with SIGKILL, the S3 server's process group is killed and started again after an outage.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

TRAINER_TIMEOUT_S = 600


class StoppableS3:
    """The module's SeaweedFS (kubetune_cli.localenv.s3_server.S3Server with a kept data dir): `stop()` kills
    the server, `start()` runs the same command again, so the same endpoint comes back with the same data."""

    def __init__(self, server: Any) -> None:
        self.server = server
        self._argv: list[str] | None = None

    def stop(self) -> float:
        proc = self.server._proc  # the running `weed mini` (ManagedProcess)
        self._argv = list(proc.argv)
        proc.stop(grace=0.5)
        return time.monotonic()

    def start(self, timeout: float = 60.0) -> float:
        from kubetune_cli.localenv.processes import ManagedProcess

        assert self._argv is not None, "start() after stop()"
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.server.access_key, AWS_SECRET_ACCESS_KEY=self.server.secret_key)
        self.server._proc = ManagedProcess(
            "weed-mini", self._argv, self.server.workdir / "weed.log", env=env, cwd=self.server.workdir
        )
        client = self.server.client(retries=0, timeout=2.0)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            try:
                client.list_buckets()
                return time.monotonic()
            except Exception:  # noqa: BLE001 - connection refused while it starts
                time.sleep(0.2)
        raise AssertionError(f"SeaweedFS did not come back within {timeout} s")


@dataclass
class Driver:
    """A running trainer driver (`python -m kubetune_trainer --config ...`), its output in a file."""

    proc: subprocess.Popen
    log: Path
    trace_dir: Path
    started: float = field(default_factory=time.monotonic)

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def wait(self, timeout: float = TRAINER_TIMEOUT_S) -> int:
        try:
            return self.proc.wait(timeout=max(1.0, self.started + timeout - time.monotonic()))
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise AssertionError(f"the trainer did not finish in {timeout} s:\n{self.output()[-4000:]}") from None

    def final_line(self) -> str:
        lines = [ln for ln in self.output().splitlines() if ln.startswith("kubetune-trainer: ")]
        return lines[-1] if lines else ""


def start_driver(
    config: dict[str, Any], workdir: Path, env: dict[str, str], tag: str, trace: Path | None = None
) -> Driver:
    """The trainer driver in its own session; its micro-batch trace in `trace` (default workdir/trace-<tag>)."""
    path = workdir / f"{tag}.json"
    path.write_text(json.dumps(config))
    trace = trace or workdir / f"trace-{tag}"
    trace.mkdir(parents=True, exist_ok=True)
    log = workdir / f"{tag}.log"
    full = {**os.environ, **env, "KUBETUNE_TRACE_DIR": str(trace)}
    proc = subprocess.Popen(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(path)],
        env=full,
        stdout=open(log, "w"),  # noqa: SIM115 - the child keeps writing to it after this returns
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    return Driver(proc=proc, log=log, trace_dir=trace)


def trace_rows(trace_dir: Path) -> dict[int, list[dict[str, Any]]]:
    """rank -> every micro-batch it trained on, in order, over all attempts (the files are appended)."""
    out: dict[int, list[dict[str, Any]]] = {}
    for path in sorted(trace_dir.glob("rank-*.jsonl")):
        rows = []
        for line in path.read_text().splitlines():
            try:
                rows.append(json.loads(line))
            except ValueError:  # a line cut off by the kill
                continue
        out[int(path.stem.split("-")[1])] = rows
    return out


def max_step(trace_dir: Path) -> int:
    return max((r["step"] for rows in trace_rows(trace_dir).values() for r in rows), default=0)


def lineage(rows: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The micro-batches whose updates are in the final weights, and how many steps were redone.

    A restart resumes from a checkpoint: the steps after it that the lost attempt had trained are discarded
    (the weights are those of the checkpoint) and trained again. So whenever the trace goes back to an earlier
    step, everything from that step on is dropped from the lineage."""
    kept: list[dict[str, Any]] = []
    redone: set[int] = set()
    for row in rows:
        if kept and row["step"] < kept[-1]["step"]:
            redone |= {r["step"] for r in kept if r["step"] >= row["step"]}
            kept = [r for r in kept if r["step"] < row["step"]]
        kept.append(row)
    return kept, len(redone)


def records_twice(kept: list[dict[str, Any]]) -> int:
    """Rows trained more than once within one epoch in the lineage (0 when every record counts once)."""
    seen: dict[int, set[int]] = {}
    twice = 0
    for row in kept:
        epoch_rows = seen.setdefault(row["epoch"], set())
        twice += len(epoch_rows & set(row["rows"]))
        epoch_rows |= set(row["rows"])
    return twice


def train_workers(cluster_pid: int) -> list[Any]:
    """The Ray Train worker processes of the Ray cluster whose `ray start` has pid `cluster_pid` (descendants
    only: other Ray clusters on the machine are never touched)."""
    import psutil

    out = []
    for proc in psutil.Process(cluster_pid).children(recursive=True):
        try:
            if "RayTrainWorker" in " ".join(proc.cmdline()):
                out.append(proc)
        except psutil.Error:
            continue
    return out


def wait_for(what: str, check: Callable[[], Any], timeout: float, driver: Driver | None = None) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        if driver is not None and driver.proc.poll() is not None:
            raise AssertionError(
                f"the trainer exited ({driver.proc.returncode}) before {what}:\n{driver.output()[-4000:]}"
            )
        time.sleep(0.2)
    raise AssertionError(f"timed out waiting for {what}" + (f":\n{driver.output()[-3000:]}" if driver else ""))
