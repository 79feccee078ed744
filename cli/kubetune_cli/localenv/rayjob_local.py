"""One attempt of a KubeRay RayJob on this machine: its RayCluster as a one-node local Ray cluster, and its
entrypoint run the way KubeRay's submitter runs it.

Development tool, shared by `kubetune run` (which builds the RayJob with the operator's own builders and
runs it without an API server) and the `kubetune dev` runtime (which runs the RayJobs the operator creates).

From the RayJob's `rayClusterSpec`:
- the cluster advertises what its pods would: head `num-cpus` plus, per worker group, replicas x the
  container's CPU limit (whole CPUs, as Ray counts a pod's CPUs) and `num-gpus`;
- the Ray processes get the worker pods' environment and volumes (the job's S3 keys from its Secret, the
  mounted trainer config), the entrypoint gets the head pod's, plus RAY_ADDRESS.
"""

from __future__ import annotations

import math
import secrets
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

from kubetune_cli.localenv.entrypoint import final_message, image_env, start_entrypoint
from kubetune_cli.localenv.pod_sandbox import Lookup, PodSandbox
from kubetune_cli.localenv.processes import ManagedProcess
from kubetune_cli.localenv.raycluster import LocalRayCluster


def cpu_count(quantity: str | int | float | None) -> float:
    if quantity is None:
        return 0.0
    q = str(quantity)
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def cluster_resources(ray_job: Mapping[str, Any]) -> tuple[int, int]:
    """(CPUs, GPUs) the RayJob's RayCluster would advertise to Ray."""
    cluster = (ray_job.get("spec") or {}).get("rayClusterSpec") or {}
    head = cluster.get("headGroupSpec") or {}
    cpus = float((head.get("rayStartParams") or {}).get("num-cpus", 0) or 0)
    gpus = 0
    for group in cluster.get("workerGroupSpecs") or []:
        replicas = int(group.get("replicas", group.get("minReplicas", 1)) or 0)
        params = group.get("rayStartParams") or {}
        if "num-cpus" in params:
            per = float(params["num-cpus"])
        else:
            container = ((group.get("template") or {}).get("spec") or {}).get("containers", [{}])[0]
            limits = (container.get("resources") or {}).get("limits") or {}
            per = max(1.0, math.floor(cpu_count(limits.get("cpu", 1))))
        cpus += replicas * per
        gpus += replicas * int(params.get("num-gpus", 0) or 0)
    return max(1, int(cpus)), gpus


class LocalRayJobRun:
    """One attempt: `start()` brings up the cluster and submits the entrypoint; `poll()` reports its exit."""

    def __init__(
        self,
        ray_job: Mapping[str, Any],
        workdir: Path,
        *,
        config_maps: Lookup,
        secrets: Lookup,
        extra_env: Mapping[str, str] | None = None,
        on_spawn: Callable[[list[int]], None] | None = None,
    ) -> None:
        self.ray_job = ray_job
        self.workdir = workdir.resolve()  # paths are handed to processes with other working dirs
        self.extra_env = dict(extra_env or {})
        self._on_spawn = on_spawn  # told every process group at once (the dev runtime's pid files)
        meta = ray_job["metadata"]
        cluster = ray_job["spec"]["rayClusterSpec"]
        self._head_pod = cluster["headGroupSpec"]["template"]["spec"]
        groups = cluster.get("workerGroupSpecs") or []
        self._worker_pod = groups[0]["template"]["spec"] if groups else self._head_pod
        ns = meta.get("namespace", "default")
        self.head = PodSandbox(
            self.workdir / "head",
            self._head_pod,
            namespace=ns,
            pod_name=f"{meta['name']}-head",
            config_maps=config_maps,
            secrets=secrets,
        )
        self.worker = PodSandbox(
            self.workdir / "worker",
            self._worker_pod,
            namespace=ns,
            pod_name=f"{meta['name']}-worker",
            config_maps=config_maps,
            secrets=secrets,
        )
        self.cpus, self.gpus = cluster_resources(ray_job)
        self.cluster: LocalRayCluster | None = None
        self.driver: ManagedProcess | None = None
        self.started_at: float | None = None
        self.ended_at: float | None = None

    @property
    def driver_log(self) -> Path:
        return self.workdir / "driver.log"

    @property
    def ray_log(self) -> Path:
        return self.workdir / "ray.log"

    def start_cluster(self) -> None:
        """Materialise the pods' volumes and start Ray with the worker pods' environment (PodConfigError,
        RayClusterError on failure)."""
        self.head.materialise()
        self.worker.materialise()
        container = self._worker_pod["containers"][0]
        env = image_env({**_host_env(), **self.worker.env(container), **self.extra_env})
        # KubeRay's authOptions.mode token: a fresh token per cluster, known to its processes and the driver only.
        auth = (self.ray_job["spec"].get("rayClusterSpec") or {}).get("authOptions") or {}
        token = secrets.token_hex(32) if auth.get("mode") == "token" else None
        self.cluster = LocalRayCluster(
            self.ray_log,
            num_cpus=self.cpus,
            num_gpus=self.gpus,
            env=env,
            on_spawn=lambda pid: self._spawned(),
            auth_token=token,
        )
        self.cluster.start()  # stop() from another thread makes this fail instead of leaving a cluster behind

    @property
    def cluster_ready(self) -> bool:
        return self.cluster is not None and self.cluster.ready

    def _spawned(self) -> None:
        if self._on_spawn is not None:
            self._on_spawn(self.pids())

    def submit(self) -> None:
        """Run the entrypoint through a shell with the head pod's environment and RAY_ADDRESS."""
        assert self.cluster is not None
        container = self._head_pod["containers"][0]
        env = image_env({**_host_env(), **self.head.env(container), **self.extra_env, **self.cluster.driver_env()})
        command = self.head.localize(self.ray_job["spec"]["entrypoint"], container)
        self.started_at = time.time()
        self.driver = start_entrypoint(command, env, self.driver_log, self.workdir)
        self._spawned()

    def poll(self) -> int | None:
        """The entrypoint's exit code once it has ended, else None."""
        if self.driver is None:
            return None
        rc = self.driver.popen.poll()
        if rc is not None and self.ended_at is None:
            self.ended_at = time.time()
        return rc

    def message(self) -> str:
        return final_message(self.driver_log)

    def stop(self) -> None:
        """Stop the entrypoint and the cluster (shutdownAfterJobFinishes, suspension, deletion)."""
        driver, self.driver = self.driver, None
        if driver is not None:
            driver.stop(grace=10.0)
        cluster, self.cluster = self.cluster, None
        if cluster is not None:
            cluster.stop()

    def pids(self) -> list[int]:
        driver, cluster = self.driver, self.cluster
        return [p for p in (driver.pid if driver else None, cluster.pid if cluster else None) if p]


# Host variables a pod would not have but a local process needs (locale, home, temp); the rest of the host's
# environment (e.g. the user's own AWS keys or KUBECONFIG) is not handed to the job.
_HOST_VARS = ("PATH", "HOME", "USER", "LANG", "LC_ALL", "TMPDIR", "TERM", "KUBETUNE_CACHE", "HF_HOME", "XDG_CACHE_HOME")


def _host_env() -> dict[str, str]:
    import os

    env = {k: os.environ[k] for k in _HOST_VARS if k in os.environ}
    # Nothing can be downloaded from a model hub here, and a pod has no reason to try.
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", TOKENIZERS_PARALLELISM="false")
    return env
