"""The LOCAL RUNTIME's kubelet for inference Deployments (development tool; see kubetune_cli.localenv.dev_runtime).

For every Deployment labelled kubetune.io/job or kubetune.io/inference-server (the operator's vLLM
Deployments: a job's own, or a shared multi-LoRA server's), each replica runs as local
processes from its pod template: the init containers in order (`python3 -m kubetune.fetch ...` with the
job's S3 keys from its Secret), then the server container. Volumes are folders of the replica's sandbox and
mount paths in arguments and environment point there (kubetune_cli.localenv.pod_sandbox). Containers run from this
machine's environments instead of images: the vLLM server from the serving virtualenv
(tools/serving-venv.sh), anything else from kubetune's own. The server listens on 127.0.0.1 on a free port
in place of its containerPort (`--host 0.0.0.0 --port 8000` become `--host 127.0.0.1 --port <free>`).

Status: the replica is ready when its readiness probe (HTTP GET) answers 200; the Deployment's status is then
written as kube-controller-manager writes it (kubetune_cli.localenv.kubelet.deployment_status: readyReplicas,
availableReplicas, Available/Progressing conditions). A server that exits is restarted (restartPolicy Always)
after a back-off, and counts as not ready meanwhile.

Reaching the model: the Service's cluster DNS name does not resolve on the host, so the runtime annotates
each Service that selects the pods with `kubetune.io/local-url: http://127.0.0.1:<port>`, the local address
of the Service (`kubetune status` shows it, with the endpoint's path: .../v1).
"""

from __future__ import annotations

import contextlib
import logging
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_cli.localenv.dev_runtime import LocalRuntime
from kubetune_cli.localenv.entrypoint import image_env
from kubetune_cli.localenv.kubelet import deployment_status, replica_set_name
from kubetune_cli.localenv.pod_sandbox import PodConfigError, PodSandbox
from kubetune_cli.localenv.processes import ManagedProcess, free_ports
from kubetune_cli.localenv.rest import RestError

log = logging.getLogger(__name__)

# The operator's Deployments: a job's own inference server, and shared inference servers.
DEPLOYMENT_LISTS = (
    "/apis/apps/v1/deployments?labelSelector=kubetune.io%2Fjob",
    "/apis/apps/v1/deployments?labelSelector=kubetune.io%2Finference-server",
)
LOCAL_URL_ANNOTATION = "kubetune.io/local-url"
INIT_TIMEOUT_S = 1800
RESTART_BACKOFF_S = 10.0


def deployment_path(ns: str, name: str, sub: str = "") -> str:
    return f"/apis/apps/v1/namespaces/{ns}/deployments/{name}" + (f"/{sub}" if sub else "")


class DeploymentWatcher:
    """Keeps one controller thread per kubetune Deployment (called from the runtime's loop)."""

    def __init__(self, rt: Any) -> None:
        self.rt = rt

    def sync(self) -> None:
        for path in DEPLOYMENT_LISTS:
            for dep in self.rt.rest.items(path):
                self.rt._ensure_thread("deployment", dep, DeploymentRunner)


class Replica:
    """One pod of the Deployment: init containers, then the server, in a sandbox folder."""

    def __init__(self, runner: DeploymentRunner, dep: dict[str, Any], index: int) -> None:
        self.runner = runner
        rt = runner.rt
        ns = dep["metadata"]["namespace"]
        self.template = dep["spec"]["template"]
        self.revision = replica_set_name(dep)
        self.name = f"{self.revision}-{index}"
        self.root = rt.state_dir / "serving" / ns / dep["metadata"]["name"] / self.name
        self.sandbox = PodSandbox(
            self.root,
            self.template["spec"],
            namespace=ns,
            pod_name=self.name,
            config_maps=lambda n: rt.configmap_data(ns, n),
            secrets=lambda n: rt.secret_data(ns, n),
        )
        self.port_map: dict[int, int] = {}
        self.proc: ManagedProcess | None = None
        self.ready = False
        self.stopping = threading.Event()
        self.error: str | None = None
        self.thread = threading.Thread(target=self._run, name=f"pod-{self.name}", daemon=True)

    @property
    def url(self) -> str | None:
        return f"http://127.0.0.1:{next(iter(self.port_map.values()))}" if self.port_map and self.ready else None

    def local_port(self, container_port: int) -> int | None:
        return self.port_map.get(container_port)

    def start(self) -> Replica:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.stopping.set()
        proc, self.proc = self.proc, None
        if proc is not None:
            proc.stop(grace=15.0)
        self.ready = False

    def _run(self) -> None:
        """Init containers, then the server; everything again after a back-off when something fails."""
        inits = self.template["spec"].get("initContainers") or []
        server = self.template["spec"]["containers"][0]
        while not self.stopping.is_set():
            try:
                self.sandbox.materialise()
                if all(self._run_init(c) for c in inits):
                    self._serve(server)
            except PodConfigError as e:
                self._fail("CreateContainerConfigError", str(e))
            except Exception as e:
                log.exception("pod %s", self.name)
                self._fail("Failed", f"{type(e).__name__}: {e}")
            if not self.stopping.wait(RESTART_BACKOFF_S):
                log.warning("pod %s: restarting after a failure", self.name)

    def _fail(self, reason: str, message: str) -> None:
        self.error = f"{reason}: {message}"
        self.runner.event("Warning", reason, f"pod {self.name}: {message}")

    def _command(self, container: dict[str, Any]) -> tuple[list[str], dict[str, str]]:
        from kubetune_cli.localenv.rayjob_local import _host_env

        env = {**_host_env(), **self.sandbox.env(container)}
        argv = self.sandbox.argv(container, env)
        if argv and Path(argv[0]).name.startswith("python"):
            if "vllm.entrypoints.openai.api_server" in argv:
                from kubetune_cli.localenv.vllm_server import local_vllm_env, serving_venv_dir, serving_venv_python

                python = serving_venv_python()
                if python is None:
                    raise PodConfigError(
                        f"the vLLM serving environment is missing at {serving_venv_dir()} (the "
                        "local stand-in for the inference image): run tools/serving-venv.sh"
                    )
                argv[0] = str(python)
                return argv, local_vllm_env(base_env=env)
            argv[0] = sys.executable  # kubetune's own environment plays the image
        return argv, image_env(env)

    def _run_init(self, container: dict[str, Any]) -> bool:
        argv, env = self._command(container)
        log_path = self.root / f"{container['name']}.log"
        proc = ManagedProcess(container["name"], argv, log_path, env=env, cwd=self.root)
        self.proc = proc
        self.runner.rt.record_pids(f"pod-{self.name}", [proc.pid])
        deadline = time.monotonic() + INIT_TIMEOUT_S
        while proc.popen.poll() is None:
            if self.stopping.wait(0.5) or time.monotonic() > deadline:
                proc.stop()
                return False
        self.proc = None
        self.runner.rt.record_pids(f"pod-{self.name}", [])
        if proc.popen.returncode != 0:
            self._fail(
                "BackOff", f"init container {container['name']} exited with {proc.popen.returncode}: {proc.log_tail(3)}"
            )
            return False
        return True

    def _serve(self, container: dict[str, Any]) -> None:
        argv, env = self._command(container)
        ports = [p["containerPort"] for p in container.get("ports") or []]
        self.port_map = dict(zip(ports, free_ports(len(ports)), strict=True))
        argv = _rewrite_listen(argv, self.port_map)
        log_path = self.root / f"{container['name']}.log"
        self.proc = ManagedProcess(container["name"], argv, log_path, env=env, cwd=self.root)
        self.runner.rt.record_pids(f"pod-{self.name}", [self.proc.pid])
        if self.stopping.is_set():  # stop() ran while we were spawning
            self.proc.stop(grace=1.0)
        probe = container.get("readinessProbe") or container.get("startupProbe") or {}
        url = self._probe_url(container, probe)
        while not self.stopping.is_set():
            proc = self.proc
            if proc is None or not proc.alive():
                break
            ok = url is None or _http_ok(url)
            if ok != self.ready:
                self.ready = ok
                self.runner.changed.set()
            self.stopping.wait(2.0 if self.ready else 1.0)
        if self.ready:
            self.ready = False
            self.runner.changed.set()
        if self.proc is not None and not self.stopping.is_set():
            self._fail(
                "BackOff",
                f"container {container['name']} exited with {self.proc.popen.poll()}: {self.proc.log_tail(5)}",
            )
            self.proc.stop()
            self.proc = None
        self.runner.rt.record_pids(f"pod-{self.name}", [])

    def _probe_url(self, container: dict[str, Any], probe: dict[str, Any]) -> str | None:
        http = probe.get("httpGet")
        if not http:
            return None
        port = http.get("port")
        if isinstance(port, str):  # a named port
            port = next((p["containerPort"] for p in container.get("ports") or [] if p.get("name") == port), None)
        local = self.port_map.get(int(port)) if port is not None else None
        return f"http://127.0.0.1:{local}{http.get('path', '/')}" if local else None


class DeploymentRunner:
    """The Deployment controller + kubelets for one Deployment."""

    def __init__(self, rt: Any, ns: str, name: str, uid: str) -> None:
        self.rt, self.ns, self.name, self.uid = rt, ns, name, uid
        self.replicas: list[Replica] = []
        self.changed = threading.Event()
        self._last_status: Any = None
        self._dep: dict[str, Any] | None = None

    def event(self, type_: str, reason: str, message: str) -> None:
        if self._dep is not None:
            self.rt.rest.event(self._dep, type_, reason, message, component="kubetune-dev-kubelet")

    def run(self) -> None:
        try:
            while not self.rt.stopping.is_set():
                dep = self.rt.rest.get(deployment_path(self.ns, self.name))
                if dep is None or dep["metadata"]["uid"] != self.uid or dep["metadata"].get("deletionTimestamp"):
                    break
                self._dep = dep
                try:
                    self._sync(dep)
                except RestError as e:
                    if e.status not in (404, 409):
                        log.warning("Deployment %s/%s: %s", self.ns, self.name, e)
                self.changed.wait(self.rt.poll)
                self.changed.clear()
        except Exception:
            log.exception("Deployment %s/%s", self.ns, self.name)
        finally:
            for r in self.replicas:
                r.stop()
            with contextlib.suppress(Exception):
                self._annotate_services(None)

    def _sync(self, dep: dict[str, Any]) -> None:
        want = int(dep["spec"].get("replicas", 1))
        revision = replica_set_name(dep)
        stale = [r for r in self.replicas if r.revision != revision]
        for r in stale:  # a new pod template: replace the pods (a recreate, not a rolling update)
            r.stop()
            self.replicas.remove(r)
        while len(self.replicas) > want:
            self.replicas.pop().stop()
        while len(self.replicas) < want:
            self.replicas.append(Replica(self, dep, len(self.replicas)).start())
        ready = sum(1 for r in self.replicas if r.ready)
        status = deployment_status(dep, ready=ready)
        key = (dep["metadata"].get("generation"), ready, want)
        if key != self._last_status:
            dep["status"] = status
            self.rt.rest.call("PUT", deployment_path(self.ns, self.name, "status"), dep)
            self._last_status = key
            self._annotate_services(next((r.url for r in self.replicas if r.url), None))

    def _annotate_services(self, url: str | None) -> None:
        """Put (or remove) the local URL on the Services that select this Deployment's pods."""
        labels = ((self._dep or {}).get("spec", {}).get("template", {}).get("metadata") or {}).get("labels") or {}
        for svc in self.rt.rest.items(f"/api/v1/namespaces/{self.ns}/services"):
            sel = (svc.get("spec") or {}).get("selector") or {}
            if not sel or any(labels.get(k) != v for k, v in sel.items()):
                continue
            current = (svc["metadata"].get("annotations") or {}).get(LOCAL_URL_ANNOTATION)
            if current != url:
                self.rt.rest.merge_patch(
                    f"/api/v1/namespaces/{self.ns}/services/{svc['metadata']['name']}",
                    {"metadata": {"annotations": {LOCAL_URL_ANNOTATION: url}}},
                )


def _rewrite_listen(argv: list[str], port_map: dict[int, int]) -> list[str]:
    """`--host <any>` -> 127.0.0.1 and `--port <containerPort>` -> its local port (both spellings)."""
    out: list[str] = []
    it = iter(range(len(argv)))
    for i in it:
        a = argv[i]
        if a in ("--host", "--port") and i + 1 < len(argv):
            value = argv[i + 1]
            out += [a, "127.0.0.1" if a == "--host" else str(port_map.get(int(value), value))]
            next(it, None)
        elif a.startswith("--host="):
            out.append("--host=127.0.0.1")
        elif a.startswith("--port="):
            value = a.split("=", 1)[1]
            out.append(f"--port={port_map.get(int(value), value)}")
        else:
            out.append(a)
    return out


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=3) as r:
            return bool(r.status == 200)
    except (urllib.error.URLError, OSError, ValueError):
        return False


class LocalKubelet(LocalRuntime):
    """Only the kubelet's part of the local runtime: the operator's Deployments run as local processes, no
    RayJob controllers (for tests that play KubeRay themselves). `start()`, then `stop()` ends every replica."""

    def _loop(self) -> None:
        while not self.stopping.is_set():
            try:
                self._deployments.sync()
            except RestError as e:
                log.warning("kubelet: listing failed (%s); retrying", e)
            except Exception:
                log.exception("kubelet loop")
            self.stopping.wait(self.poll)
