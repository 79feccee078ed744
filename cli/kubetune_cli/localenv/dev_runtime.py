"""The LOCAL RUNTIME of `kubetune dev`: a development tool that plays KubeRay and the kubelet on one machine.

It is not part of kubetune's production path. On a real cluster KubeRay runs RayJobs on RayClusters of pods,
and the kubelet runs the inference Deployment's pods. A development machine has neither (no container
engine, often no GPU), so this runtime does their jobs for the objects kubetune creates, against the real
API server of the dev cluster, writing status exactly where and how those components write it:

- RayJobs (all namespaces): each one gets a controller thread that walks KubeRay's state machine
  (`kubetune_cli.localenv.kuberay.next_status`, one pass per observed change, status written through the status
  subresource only when jobStatus or jobDeploymentStatus changed, KubeRay's finalizer added and removed).
  Its RayCluster is a one-node Ray cluster on 127.0.0.1 sized like the RayCluster spec; its entrypoint runs
  with the head pod's environment (Secrets and ConfigMaps resolved, volumes as local folders) and, in place
  of the pod's in-cluster ServiceAccount, a kubeconfig for that same ServiceAccount, so the trainer's status
  patches go through the same narrow RBAC. Suspension, activeDeadlineSeconds, backoffLimit (Retrying, the
  next attempt resuming from the checkpoint) and deletion behave as with KubeRay. A RayJob asking for GPUs
  this machine lacks stays Initializing with a FailedScheduling Event, as its pods would stay Pending.
- Deployments labelled kubetune.io/job: see kubetune_cli.localenv.deployments (the kubelet's part).

Built-in samples: before a RayJob whose trainer config names s3://kubetune-samples/... starts, the runtime
uploads them into the dev S3 (only when the job's endpoint is the dev S3) and creates missing buckets.
Logs: <state>/jobs/<namespace>/<rayjob>/attempt-<n>/{driver,ray}.log (`kubetune logs NAME`).
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from kubetune_cli.localenv import kuberay
from kubetune_cli.localenv.kubeclient import current_cluster, load_kubeconfig, write_kubeconfig
from kubetune_cli.localenv.pod_sandbox import PodConfigError
from kubetune_cli.localenv.raycluster import RayClusterError
from kubetune_cli.localenv.rayjob_local import LocalRayJobRun
from kubetune_cli.localenv.rest import Rest, RestError

log = logging.getLogger(__name__)

RAYJOBS = "/apis/ray.io/v1/rayjobs"
POLL_S = 1.0
RETRY_S = 10.0


def rayjob_path(ns: str, name: str, sub: str = "") -> str:
    return f"/apis/ray.io/v1/namespaces/{ns}/rayjobs/{name}" + (f"/{sub}" if sub else "")


@dataclass
class DevS3:
    """The dev cluster's S3: `endpoint` as manifests name it, `client()` for the runtime's own uploads."""

    endpoint: str
    client: Callable[[], Any]


class LocalRuntime:
    """Starts a controller thread per RayJob and per kubetune Deployment; `stop()` ends them all."""

    def __init__(
        self,
        kubeconfig: Path,
        state_dir: Path,
        *,
        s3: DevS3 | None = None,
        pid_dir: Path | None = None,
        poll: float = POLL_S,
    ) -> None:
        self.kubeconfig = kubeconfig
        self.state_dir = state_dir
        self.s3 = s3
        self.pid_dir = pid_dir
        self.poll = poll
        self.rest = Rest(kubeconfig)
        self.stopping = threading.Event()
        self._threads: dict[str, threading.Thread] = {}
        self._main: threading.Thread | None = None

    def start(self) -> LocalRuntime:
        from kubetune_cli.localenv.deployments import DeploymentWatcher

        self._deployments = DeploymentWatcher(self)
        self._main = threading.Thread(target=self._loop, name="runtime", daemon=True)
        self._main.start()
        return self

    def stop(self, timeout: float = 60.0) -> None:
        self.stopping.set()
        deadline = time.monotonic() + timeout
        for t in [self._main, *self._threads.values()]:
            if t is not None:
                t.join(max(0.1, deadline - time.monotonic()))
        self.rest.close()

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                for rj in self.rest.items(RAYJOBS):
                    self._ensure_thread("rayjob", rj, RayJobController)
                self._deployments.sync()
            except RestError as e:
                log.warning("runtime: listing failed (%s); retrying", e)
            except Exception:  # the runtime keeps going; the error is in its log
                log.exception("runtime loop")
            self.stopping.wait(self.poll)

    def _ensure_thread(self, kind: str, obj: dict[str, Any], cls: type) -> None:
        uid = obj["metadata"]["uid"]
        t = self._threads.get(uid)
        if t is not None and t.is_alive():
            return
        if t is not None:
            return  # its controller finished (object gone or terminal); a new uid gets a new one
        ctrl = cls(self, obj["metadata"]["namespace"], obj["metadata"]["name"], uid)
        t = threading.Thread(target=ctrl.run, name=f"{kind}-{obj['metadata']['name']}", daemon=True)
        self._threads[uid] = t
        t.start()

    # ---- shared helpers -----------------------------------------------------------------------------------

    def record_pids(self, key: str, pids: list[int]) -> None:
        """Remember process groups this runtime started, so `kubetune dev down` can end them after a crash."""
        if self.pid_dir is None:
            return
        self.pid_dir.mkdir(parents=True, exist_ok=True)
        path = self.pid_dir / f"{key}.json"
        if pids:
            path.write_text(json.dumps(pids))
        else:
            path.unlink(missing_ok=True)

    def secret_data(self, ns: str, name: str) -> dict[str, str] | None:
        secret = self.rest.get(f"/api/v1/namespaces/{ns}/secrets/{name}")
        if secret is None:
            return None
        return {k: base64.b64decode(v).decode() for k, v in (secret.get("data") or {}).items()}

    def configmap_data(self, ns: str, name: str) -> dict[str, str] | None:
        cm = self.rest.get(f"/api/v1/namespaces/{ns}/configmaps/{name}")
        return None if cm is None else dict(cm.get("data") or {})

    def service_account_kubeconfig(self, ns: str, name: str, path: Path, timeout: float = 60.0) -> Path:
        """A kubeconfig that authenticates as ServiceAccount ns/name (the pod's in-cluster identity)."""
        deadline = time.monotonic() + timeout
        token = None
        while token is None:
            sa = self.rest.get(f"/api/v1/namespaces/{ns}/serviceaccounts/{name}") or {}
            for ref in sa.get("secrets") or []:
                data = self.secret_data(ns, ref["name"]) or {}
                token = data.get("token") or token
            if token is None:
                if time.monotonic() > deadline or self.stopping.is_set():
                    raise PodConfigError(f'no token for serviceaccount "{name}" (is it created?)')
                time.sleep(0.5)
        _, cluster = current_cluster(load_kubeconfig(self.kubeconfig))
        return write_kubeconfig(
            path,
            server=cluster["server"],
            token=token,
            ca_data_b64=cluster.get("certificate-authority-data"),
            user=f"system:serviceaccount:{ns}:{name}",
            namespace=ns,
        )

    def seed_for(self, config: dict[str, Any]) -> None:
        """Upload built-ins a trainer config reads and create its buckets, when it uses the dev S3."""
        if self.s3 is None:
            return
        from kubetune import api
        from kubetune_cli.localenv import builtin

        cfg = api.TrainerConfig.model_validate(config)
        if (cfg.spec.dataset.endpoint or "").rstrip("/") != self.s3.endpoint.rstrip("/"):
            return
        client = self.s3.client()
        for uri in (cfg.spec.output.uri, *cfg.spec.dataset.train_uris(), cfg.spec.model.uri):
            builtin.ensure_bucket(client, uri[len("s3://") :].split("/", 1)[0])
        builtin.seed(client, builtin.referenced(builtin.spec_uris(cfg.spec)))


class RayJobController:
    """KubeRay's controller for one RayJob, with the RayCluster and submitter played by local processes."""

    def __init__(self, rt: LocalRuntime, ns: str, name: str, uid: str) -> None:
        self.rt, self.ns, self.name, self.uid = rt, ns, name, uid
        self.kuberay = kuberay.KubeRay(rt.kubeconfig)
        self.run_: LocalRayJobRun | None = None
        self.attempt = 0
        self._starting: threading.Thread | None = None
        self._start_error: str | None = None
        self._next_try = 0.0
        self._job_start: datetime | None = None
        self._result: kuberay.JobInfo | None = None  # how this attempt's Ray job ended, until KubeRay saw it
        self.workdir_root = rt.state_dir / "jobs" / ns / name

    def run(self) -> None:
        try:
            while not self.rt.stopping.is_set():
                rj = self.rt.rest.get(rayjob_path(self.ns, self.name))
                if rj is None or rj["metadata"]["uid"] != self.uid:
                    break  # deleted
                if rj["metadata"].get("deletionTimestamp"):
                    self._delete(rj)
                    break
                try:
                    self._step(rj)
                except RestError as e:
                    if e.status not in (404, 409):  # 409: raced with the operator's patch; next pass
                        log.warning("RayJob %s/%s: %s", self.ns, self.name, e)
                self.rt.stopping.wait(self.rt.poll)
        except Exception:  # logged with its traceback; the runtime keeps going
            log.exception("RayJob %s/%s controller", self.ns, self.name)
        finally:
            self._stop_run()
            self.kuberay.close()

    # ---- one pass -------------------------------------------------------------------------------------------

    def _reconcile(self, world: kuberay.World | None = None) -> dict[str, Any]:
        return self.kuberay.reconcile(self.ns, self.name, world)

    def _step(self, rj: dict[str, Any]) -> None:
        st = rj.get("status") or {}
        jds, js = st.get("jobDeploymentStatus") or "", st.get("jobStatus") or ""
        suspend = bool(rj["spec"].get("suspend"))
        if jds == "":
            if not suspend:
                self._reconcile()  # -> Initializing (jobId, rayClusterName, startTime), finalizer
        elif jds == "Initializing":
            if suspend or self._deadline_passed(rj):
                self._stop_run()
                self._reconcile()  # -> Suspending / Failed (DeadlineExceeded)
            elif self._cluster_ready(rj):
                self._reconcile(kuberay.World(cluster_ready=True))  # -> Running, dashboardURL
        elif jds == "Running":
            self._running(rj, js, suspend)
        elif jds in ("Suspending", "Retrying"):
            self._stop_run()
            self._reconcile()  # -> Suspended / New (the next attempt)
        elif jds == "Suspended":
            if not suspend:
                self._reconcile()  # -> New
        elif jds in ("Complete", "Failed"):
            self._stop_run()  # shutdownAfterJobFinishes: the cluster goes, the RayJob and its status stay

    def _running(self, rj: dict[str, Any], js: str, suspend: bool) -> None:
        if self._result is not None:
            self._reconcile(kuberay.World(job=self._result))  # the write failed last time; say it again
            return
        run = self.run_
        if suspend or self._deadline_passed(rj) or run is None:
            self._stop_run()
            if run is None and not suspend and not self._deadline_passed(rj):
                # The cluster went away under a Running job (e.g. the runtime restarted): the submitter fails.
                self._reconcile(
                    kuberay.World(submitter_failed=("BackoffLimitExceeded", "the local Ray cluster is gone"))
                )
            else:
                self._reconcile(kuberay.World(job=kuberay.JobInfo(js or "RUNNING")))
            return
        if run.driver is None:
            run.submit()
            self._job_start = datetime.now(UTC)
            self._reconcile(kuberay.World(job=kuberay.JobInfo("PENDING")))
            self._reconcile(kuberay.World(job=kuberay.JobInfo("RUNNING", start_time=self._job_start)))
            return
        rc = run.poll()
        if rc is None:
            if js != "RUNNING":
                self._reconcile(kuberay.World(job=kuberay.JobInfo("RUNNING", start_time=self._job_start)))
            return
        message = run.message()
        end = datetime.now(UTC)
        info = kuberay.JobInfo(
            "SUCCEEDED" if rc == 0 else "FAILED",
            message="Job finished successfully." if rc == 0 else message,
            start_time=self._job_start,
            end_time=end,
        )
        self._result = info
        self._stop_run()
        self._reconcile(kuberay.World(job=info))

    def _deadline_passed(self, rj: dict[str, Any]) -> bool:
        ads, start = rj["spec"].get("activeDeadlineSeconds"), (rj.get("status") or {}).get("startTime")
        if ads is None or start is None:
            return False
        started = datetime.fromisoformat(start.replace("Z", "+00:00"))
        return datetime.now(UTC) >= started + timedelta(seconds=int(ads))

    # ---- the RayCluster ---------------------------------------------------------------------------------------

    def _cluster_ready(self, rj: dict[str, Any]) -> bool:
        """Start the local cluster in the background; True once it is up."""
        if self.run_ is not None and self.run_.cluster_ready:
            return True
        if self._starting is not None:
            if self._starting.is_alive():
                return False
            self._starting = None
            if self._start_error is not None:
                self.rt.rest.event(rj, "Warning", "FailedCreatePod", self._start_error)
                self._next_try = time.monotonic() + RETRY_S
                self._start_error = None
                self._stop_run()
                return False
            return self.run_ is not None and self.run_.cluster_ready
        if time.monotonic() < self._next_try:
            return False
        self._starting = threading.Thread(target=self._start_cluster, args=(rj,), daemon=True)
        self._starting.start()
        return False

    def _start_cluster(self, rj: dict[str, Any]) -> None:
        try:
            self.attempt += 1
            self._result = None
            workdir = self.workdir_root / f"attempt-{self.attempt}"
            cpus_gpus = self._check_schedulable(rj)
            if cpus_gpus is not None:
                self._start_error = cpus_gpus
                return
            head_pod = rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]
            sa = head_pod.get("serviceAccountName") or "default"
            kubeconfig = self.rt.service_account_kubeconfig(self.ns, sa, workdir / "serviceaccount.kubeconfig")
            run = LocalRayJobRun(
                rj,
                workdir,
                config_maps=lambda n: self.rt.configmap_data(self.ns, n),
                secrets=lambda n: self.rt.secret_data(self.ns, n),
                extra_env=self._extra_env(kubeconfig, workdir),
                on_spawn=lambda pids: self.rt.record_pids(self.uid, pids),
            )
            self._seed(rj)
            self.run_ = run
            log.info(
                "RayJob %s/%s attempt %d: starting a local Ray cluster (%d CPUs)",
                self.ns,
                self.name,
                self.attempt,
                run.cpus,
            )
            run.start_cluster()
        except (PodConfigError, RayClusterError, RestError, ValueError) as e:
            self._start_error = str(e)
        except Exception as e:  # logged, and reported as the RayJob's start error
            log.exception("RayJob %s/%s: cluster start", self.ns, self.name)
            self._start_error = f"{type(e).__name__}: {e}"

    def _check_schedulable(self, rj: dict[str, Any]) -> str | None:
        from kubetune_cli.localenv.rayjob_local import cluster_resources

        _, gpus = cluster_resources(rj)
        if gpus and not Path("/dev/nvidia0").exists():
            return (
                f"0/1 nodes are available: 1 Insufficient GPU (the RayCluster needs {gpus}; this machine has "
                "none). Set spec.resources.gpusPerWorker: 0 to train on the CPU."
            )
        return None

    def _extra_env(self, kubeconfig: Path, workdir: Path) -> dict[str, str]:
        from kubetune_cli.localenv.binaries import cache_dir

        return {
            "KUBECONFIG": str(kubeconfig),  # stands in for the pod's mounted ServiceAccount token
            "KUBETUNE_MODEL_CACHE": str(cache_dir() / "node-model-cache"),
            "KUBETUNE_RAY_STORAGE": str(workdir / "ray-results"),
            "KUBETUNE_STAGING_DIR": str(workdir),
        }

    def _seed(self, rj: dict[str, Any]) -> None:
        """Built-ins named by the trainer config in the RayJob's config volume."""
        for vol in rj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"].get("volumes") or []:
            if "configMap" in vol:
                data = self.rt.configmap_data(self.ns, vol["configMap"]["name"]) or {}
                for text in data.values():
                    with contextlib.suppress(ValueError):
                        obj = json.loads(text)
                        if isinstance(obj, dict) and "spec" in obj and "runUri" in obj:
                            self.rt.seed_for(obj)

    def _stop_run(self) -> None:
        run, self.run_ = self.run_, None
        if run is not None:
            run.stop()
            self.rt.record_pids(self.uid, [])

    # ---- deletion -------------------------------------------------------------------------------------------

    def _delete(self, rj: dict[str, Any]) -> None:
        """What KubeRay does for a RayJob being deleted: stop the job and the cluster, drop the finalizer."""
        self._stop_run()
        with contextlib.suppress(RestError):
            self.kuberay.remove_finalizer(self.ns, self.name)
