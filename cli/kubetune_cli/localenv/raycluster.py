"""A one-node Ray cluster on 127.0.0.1, playing the RayCluster that KubeRay would start for a RayJob.

Development tool: `kubetune run` and the `kubetune dev` runtime start one per training run, so that the
trainer runs exactly as in a RayJob: its entrypoint joins an existing cluster through RAY_ADDRESS, and Ray
Train's workers are processes of that cluster, started with the cluster's (the pods') environment.

Why these settings:
- RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0 makes Ray use the loopback address as the node IP on Linux too; with
  it every Ray port listens on 127.0.0.1 only (`--node-ip-address=127.0.0.1` alone is silently replaced by
  the machine's outward address). The driver needs the same variable to find its local raylet.
- Every port is chosen free (GCS, node manager, object manager, agents, metrics), so clusters of parallel
  runs and test sessions coexist; no dashboard, no usage stats, token auth off (Ray 2.60 enables it) unless
  an `auth_token` is given: then RAY_AUTH_MODE=token with that RAY_AUTH_TOKEN for the cluster and every
  driver (`driver_env`), as KubeRay does for a RayJob with `rayClusterSpec.authOptions.mode: token`.
- `--num-cpus` is what the RayCluster would advertise: worker replicas x their CPU limit. Ray then sets
  OMP_NUM_THREADS of each training worker to its CPU share, as on Kubernetes.
- RAY_ADDRESS is set for every process of the cluster: Ray helpers that call ray.init() without an address
  refuse to guess when other Ray clusters run on the machine (parallel test runs).
- `--block` keeps `ray start` in the foreground, so stopping its process group stops the whole cluster.
"""

from __future__ import annotations

import os
import shutil
import sys
import time
from collections.abc import Callable, Mapping
from pathlib import Path

from kubetune_cli.localenv.processes import ManagedProcess, free_ports, make_workdir

RAY_BASE_ENV = {
    "RAY_USAGE_STATS_ENABLED": "0",
    "RAY_AUTH_MODE": "disabled",
    "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "0",
    "RAY_DEDUP_LOGS": "0",
    # `ray start --block` answers SIGTERM by draining its node for up to this many seconds (default 30) before
    # stopping, so every stop of a local cluster waited out stop()'s 10 s grace. A local cluster being stopped
    # has no other node to drain to; 0 means no drain, immediate teardown (ray/_private/node.py). Draining a
    # node on purpose (`ray drain-node`, the node-drain fault) is a different mechanism and is unaffected.
    "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
}
_READY_LINE = "Ray runtime started."
_OBJECT_STORE_BYTES = 512 * 1024 * 1024  # the trainer moves data through S3, not the object store
# Failures worth another try: Ray waits a fixed 30 s for its raylet to register, which a heavily loaded
# machine can exceed, and a free port can be taken between choosing and binding it.
_TRANSIENT = ("timed out during startup", "address already in use", "Address already in use")


class RayClusterError(RuntimeError):
    """The local Ray cluster did not come up (the message carries its log tail)."""


def ray_executable() -> Path:
    """`ray` of this interpreter's environment (the trainer's environment)."""
    candidate = Path(sys.executable).parent / "ray"
    if candidate.is_file():
        return candidate
    found = shutil.which("ray")
    if found:
        return Path(found)
    raise RayClusterError("the `ray` command is not installed: pip install 'ray[train]==2.60.0'")


class LocalRayCluster:
    """`ray start --head --block` on 127.0.0.1 with its own temp dir and free ports; a context manager."""

    def __init__(
        self,
        log_path: Path,
        *,
        num_cpus: int,
        num_gpus: int = 0,
        env: Mapping[str, str] | None = None,
        timeout: float = 600.0,
        on_spawn: Callable[[int], None] | None = None,
        auth_token: str | None = None,
    ) -> None:
        self.log_path = log_path
        self.num_cpus = max(1, int(num_cpus))
        self.num_gpus = int(num_gpus)
        # The whole environment of the Ray processes (the pods'); the host's when none is given.
        self.auth_env = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": auth_token} if auth_token else {}
        self.env = {**(os.environ if env is None else env), **RAY_BASE_ENV, **self.auth_env}
        self.timeout = timeout
        self.address: str | None = None
        self.temp_dir: Path | None = None
        self.startup_seconds: float | None = None
        self._proc: ManagedProcess | None = None
        self._on_spawn = on_spawn  # told the process group at once, so a crashed owner's cluster can be found
        self._stopped = False

    def __enter__(self) -> LocalRayCluster:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc else None

    def start(self) -> LocalRayCluster:
        """Start the cluster; retried while `timeout` lasts when Ray gives up on its own start-up (_TRANSIENT)."""
        if self._proc is not None:
            return self
        t0 = time.monotonic()
        while True:
            if self._stopped:
                raise RayClusterError("stopped while starting")
            try:
                self._start_once(t0 + self.timeout)
                break
            except RayClusterError as e:
                if time.monotonic() > t0 + self.timeout or not any(t in str(e) for t in _TRANSIENT):
                    raise
        self.startup_seconds = time.monotonic() - t0
        return self

    def _start_once(self, deadline: float) -> None:
        # A short path: Ray's unix sockets live below it and socket paths are limited to 107 bytes.
        self.temp_dir = make_workdir("kt-ray-")
        gcs, obj, node, agent_http, agent_grpc, runtime_env, metrics, dashboard = free_ports(8)
        argv = [
            str(ray_executable()),
            "start",
            "--head",
            "--block",
            "--node-ip-address=127.0.0.1",
            f"--port={gcs}",
            f"--num-cpus={self.num_cpus}",
            f"--num-gpus={self.num_gpus}",
            "--include-dashboard=false",
            # Ray 2.60 runs a minimal dashboard process even without the dashboard, on 8265 unless told.
            f"--dashboard-port={dashboard}",
            "--disable-usage-stats",
            f"--temp-dir={self.temp_dir}",
            f"--object-store-memory={_OBJECT_STORE_BYTES}",
            f"--object-manager-port={obj}",
            f"--node-manager-port={node}",
            f"--dashboard-agent-listen-port={agent_http}",
            f"--dashboard-agent-grpc-port={agent_grpc}",
            f"--runtime-env-agent-port={runtime_env}",
            f"--metrics-export-port={metrics}",
        ]
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        # Ray's own helper processes (e.g. Train's PlacementGroupCleaner) call ray.init() with no address; with
        # several clusters on the machine they would refuse to guess, so every process is told its cluster.
        env = {**self.env, "RAY_ADDRESS": f"127.0.0.1:{gcs}"}
        proc = self._proc = ManagedProcess("ray-head", argv, self.log_path, env=env, cwd=self.temp_dir)
        if self._on_spawn is not None:
            self._on_spawn(proc.pid)
        if self._stopped:  # stop() ran in another thread while we were spawning
            proc.stop(grace=1.0)
        while True:
            if not proc.alive():
                problem = f"`ray start` exited with {proc.popen.returncode}:\n{proc.log_tail()}"
                self._cleanup()
                raise RayClusterError(problem)
            if _READY_LINE in _read_from(self.log_path, offset):
                break
            if time.monotonic() > deadline:
                problem = f"Ray not ready after {self.timeout:.0f} s:\n{proc.log_tail()}"
                self._cleanup()
                raise RayClusterError(problem)
            time.sleep(0.25)
        self.address = f"127.0.0.1:{gcs}"

    def driver_env(self) -> dict[str, str]:
        """What a driver (the RayJob entrypoint) needs to join this cluster."""
        if self.address is None:
            raise RayClusterError("the Ray cluster is not started")
        return {**RAY_BASE_ENV, **self.auth_env, "RAY_ADDRESS": self.address}

    @property
    def ready(self) -> bool:
        return self.address is not None and self.alive()

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def stop(self) -> None:
        """Stop every Ray process of the cluster and remove its temp dir. Idempotent; also from another thread
        while `start()` runs (start then fails)."""
        self._stopped = True
        self._cleanup()

    def _cleanup(self) -> None:
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(grace=10.0)
        if self.temp_dir is not None:
            shutil.rmtree(self.temp_dir, ignore_errors=True)
            self.temp_dir = None
        self.address = None


def _read_from(path: Path, offset: int) -> str:
    try:
        with open(path, "rb") as f:
            f.seek(offset)
            return f.read().decode("utf-8", "replace")
    except OSError:
        return ""
