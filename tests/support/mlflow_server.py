"""A real MLflow tracking server on 127.0.0.1 for the tests (the `mlflow_server` fixture in tests/conftest.py).

The server is the full `mlflow` package in its own virtual environment (tools/mlflow-venv.sh; it pins a pyarrow
older than the trainer's), found at $KUBETUNE_MLFLOW_VENV or ~/.cache/kubetune/mlflow-venv. Runs are stored in
SQLite in a folder of the test session; one worker process, bound to loopback on a free port.
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

from tests.support.waiting import free_port, wait_for

START_TIMEOUT_S = 180  # database migrations on first start: ~40 s on a loaded 2-core machine


def mlflow_venv() -> Path:
    cache = Path(os.environ.get("KUBETUNE_CACHE") or Path.home() / ".cache" / "kubetune")
    return Path(os.environ.get("KUBETUNE_MLFLOW_VENV") or cache / "mlflow-venv")


class MlflowServer:
    """`mlflow server` on 127.0.0.1:<free port> with a SQLite store under `workdir`; stop() ends it."""

    def __init__(self, workdir: Path):
        self.workdir = workdir
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc: subprocess.Popen[bytes] | None = None
        self.log = workdir / "mlflow-server.log"

    def start(self) -> MlflowServer:
        exe = mlflow_venv() / "bin" / "mlflow"
        if not exe.exists():
            raise FileNotFoundError(f"{exe} is missing: run tools/mlflow-venv.sh")
        argv = [
            str(exe),
            "server",
            "--host",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--workers",
            "1",
            "--backend-store-uri",
            f"sqlite:///{self.workdir / 'mlflow.db'}",
            "--default-artifact-root",
            (self.workdir / "artifacts").as_uri(),
        ]
        env = {**os.environ, "MLFLOW_ENABLE_TELEMETRY": "false", "DO_NOT_TRACK": "1"}
        with open(self.log, "wb") as out:
            self.proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, start_new_session=True)
        try:
            wait_for(f"the MLflow server ({self.log})", self._healthy, timeout=START_TIMEOUT_S, interval=0.5)
        except BaseException:
            self.stop()
            raise
        return self

    def _healthy(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise RuntimeError(f"the MLflow server exited ({self.proc.returncode}): {self.log.read_text()[-2000:]}")
        try:
            with urllib.request.urlopen(f"{self.url}/health", timeout=2) as resp:
                return bool(resp.status == 200)
        except OSError:
            return False

    def client(self) -> Any:
        from mlflow.tracking import MlflowClient

        return MlflowClient(tracking_uri=self.url)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        # SIGKILL to its own session (uvicorn's worker goes with it): on SIGTERM the server took seconds to exit
        # after uvicorn had finished (1.5 s alone, more in a busy session), and there is nothing to shut down
        # cleanly: the SQLite store and the artifacts are the test session's temporary files, read by no one after.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        self.proc.wait(timeout=10)

    def __enter__(self) -> MlflowServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
