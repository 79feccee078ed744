"""`kubetune dev`: a local development cluster in one daemon process (development tool).

What runs (all on 127.0.0.1), each started by the daemon and stopped by it:
- the control plane: etcd + kube-apiserver + kube-controller-manager (kubetune_cli.localenv.control_plane.ControlPlane),
  with kubetune's FineTuneJob CRD and KubeRay's CRDs installed;
- S3: SeaweedFS (kubetune_cli.localenv.s3_server.S3Server) with kept data and keys, answering at a fixed address
  (http://127.0.0.1:8333 unless --s3-port) through a port forward, so manifests can name it; the Secret
  `kubetune-s3` in namespace `default` holds its keys (the quickstart's credentialsSecret);
- the operator: `python -m kubetune_operator` with the dev kubeconfig (and its admission webhook);
- the local runtime (kubetune_cli.localenv.dev_runtime): KubeRay's and the kubelet's parts for kubetune's objects.

State folder (default ~/.cache/kubetune/dev, or --dir, or $KUBETUNE_DEV_DIR):
    kubeconfig          admin kubeconfig of the dev cluster (`export KUBECONFIG=...`)
    state.json          what runs where (no secrets); `ready: true` once everything is up
    dev.pid             the daemon
    logs/               dev.log (the daemon and runtime), operator.log
    cluster/ s3/        control plane and S3 data (S3 data and keys are kept across `down`/`up`;
                        the cluster is fresh on every `up`)
    jobs/ serving/      local runs of RayJobs and inference pods, with their logs
    pids/               process groups the runtime started (ended by `down` even after a crash)

`up` starts the daemon detached and waits until it reports ready; `down` sends it SIGTERM (it stops
everything in reverse order) and then ends anything left from pids/.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from pathlib import Path
from typing import Any, cast

from kubetune_cli.localenv.processes import pid_alive

log = logging.getLogger("kubetune.dev")

DEFAULT_S3_PORT = 8333
S3_SECRET = "kubetune-s3"
S3_BUCKETS = ("kubetune-samples", "kubetune-runs")
UP_TIMEOUT_S = 300.0
DOWN_TIMEOUT_S = 90.0


def default_dir() -> Path:
    from kubetune_cli.localenv.binaries import cache_dir

    env = os.environ.get("KUBETUNE_DEV_DIR")
    return Path(env) if env else cache_dir() / "dev"


class DevEnvError(RuntimeError):
    pass


class DevEnv:
    """The state folder of one dev environment, and what can be done with it from outside the daemon."""

    def __init__(self, directory: Path) -> None:
        self.dir = directory.expanduser().resolve()

    kubeconfig = property(lambda self: self.dir / "kubeconfig")
    state_file = property(lambda self: self.dir / "state.json")
    pid_file = property(lambda self: self.dir / "dev.pid")
    log_file = property(lambda self: self.dir / "logs" / "dev.log")
    pid_dir = property(lambda self: self.dir / "pids")

    def pid(self) -> int | None:
        try:
            pid = int(self.pid_file.read_text().strip())
        except (OSError, ValueError):
            return None
        return pid if _alive(pid) else None

    def state(self) -> dict[str, Any]:
        try:
            return cast("dict[str, Any]", json.loads(self.state_file.read_text()))
        except (OSError, ValueError):
            return {}

    def running(self) -> bool:
        return self.pid() is not None and bool(self.state().get("ready"))

    # ---- up / down ------------------------------------------------------------------------------------------

    def up(
        self, *, s3_port: int = DEFAULT_S3_PORT, webhook: bool = True, timeout: float = UP_TIMEOUT_S
    ) -> dict[str, Any]:
        """Start the daemon (unless it runs) and wait until it is ready; returns its state."""
        if self.pid() is not None:
            return self._wait_ready(self.pid() or 0, timeout)
        self._kill_leftovers()
        (self.dir / "logs").mkdir(parents=True, exist_ok=True)
        self.state_file.unlink(missing_ok=True)
        argv = [
            sys.executable,
            "-m",
            "kubetune_cli.localenv.devenv",
            "serve",
            "--dir",
            str(self.dir),
            "--s3-port",
            str(s3_port),
        ] + ([] if webhook else ["--no-webhook"])
        with open(self.log_file, "ab") as out:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                cwd=self.dir,
            )
        return self._wait_ready(proc.pid, timeout, proc)

    def _wait_ready(self, pid: int, timeout: float, proc: subprocess.Popen[bytes] | None = None) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            st = self.state()
            if st.get("ready") and st.get("pid") == pid:
                return st
            if st.get("error"):
                self.down()
                raise DevEnvError(f"kubetune dev failed to start: {st['error']}\n{self._log_tail()}")
            exited = proc.poll() is not None if proc is not None else not _alive(pid)
            if exited:
                raise DevEnvError(f"the kubetune dev daemon exited while starting:\n{self._log_tail()}")
            time.sleep(0.5)
        self.down()
        raise DevEnvError(f"kubetune dev not ready after {timeout:.0f} s:\n{self._log_tail()}")

    def down(self, timeout: float = DOWN_TIMEOUT_S) -> bool:
        """Stop the daemon and everything it started; True when something was running."""
        pid = self.pid()
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while _alive(pid) and time.monotonic() < deadline:
                time.sleep(0.3)
            if _alive(pid):
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(pid, signal.SIGKILL)
        left = self._kill_leftovers()
        self.pid_file.unlink(missing_ok=True)
        self.state_file.unlink(missing_ok=True)
        return pid is not None or left

    def _kill_leftovers(self) -> bool:
        """End process groups recorded in pids/ (their owner died without stopping them)."""
        found = False
        for f in self.pid_dir.glob("*.json") if self.pid_dir.is_dir() else []:
            with contextlib.suppress(OSError, ValueError):
                for pgid in json.loads(f.read_text()):
                    if _alive(pgid):
                        found = True
                        with contextlib.suppress(ProcessLookupError, PermissionError):
                            os.killpg(pgid, signal.SIGKILL)
            f.unlink(missing_ok=True)
        return found

    def _log_tail(self, lines: int = 40) -> str:
        from kubetune_cli.localenv.processes import tail

        return tail(self.log_file, lines)


def _alive(pid: int) -> bool:
    if not pid_alive(pid):
        return False
    # A zombie (our own child that exited) is not alive.
    with contextlib.suppress(OSError):
        if Path(f"/proc/{pid}/stat").read_text().split(") ", 1)[1].startswith("Z"):
            return False
    return True


# ------------------------------------------------------------------------------------------------- daemon


class Daemon:
    """Everything `kubetune dev` runs, in start order; `stop()` goes in reverse."""

    def __init__(self, env: DevEnv, s3_port: int, webhook: bool) -> None:
        self.env = env
        self.s3_port = s3_port
        self.webhook = webhook
        self._stops: list[Any] = []
        self.state: dict[str, Any] = {"pid": os.getpid(), "dir": str(env.dir), "ready": False}

    def _write_state(self) -> None:
        tmp = self.env.state_file.with_suffix(".tmp")
        tmp.write_text(json.dumps(self.state, indent=2) + "\n")
        os.replace(tmp, self.env.state_file)

    def start(self) -> None:
        t0 = time.monotonic()
        self.env.pid_file.write_text(str(os.getpid()))
        self._write_state()
        cp = self._control_plane()
        s3 = self._s3()
        self._secret(cp, s3)
        self._operator(cp)
        self._runtime(cp, s3)
        self.state.update(ready=True, startupSeconds=round(time.monotonic() - t0, 1))
        self._write_state()
        log.info("kubetune dev ready in %.1f s", time.monotonic() - t0)

    def _control_plane(self) -> Any:
        from kubetune.crd import crd_manifest
        from kubetune_cli.localenv.control_plane import ControlPlane

        cp = ControlPlane(self.env.dir / "cluster", controller_manager=True).start()
        self._stops.append(cp.stop)
        cp.install_crds([crd_manifest()])
        cp.install_kuberay_crds()
        kubeconfig = self.env.kubeconfig
        assert cp.kubeconfig is not None  # set by start()
        kubeconfig.write_bytes(Path(cp.kubeconfig).read_bytes())
        kubeconfig.chmod(0o600)
        self.state.update(kubeconfig=str(kubeconfig), server=cp.server)
        log.info("control plane at %s", cp.server)
        return cp

    def _s3(self) -> Any:
        import secrets

        from kubetune_cli.localenv.portforward import PortForward
        from kubetune_cli.localenv.s3_server import S3Server
        from kubetune_cli.localenv.s3endpoint import CREDENTIALS_FILE, read_credentials, write_credentials

        s3_dir = self.env.dir / "s3"
        creds_path = s3_dir / CREDENTIALS_FILE
        creds = read_credentials(creds_path)
        if creds is None:
            creds = {
                "AWS_ACCESS_KEY_ID": "kt" + secrets.token_hex(8),
                "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30),
            }
            write_credentials(creds_path, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
        server = S3Server(
            s3_dir, buckets=S3_BUCKETS, access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"]
        ).start()
        self._stops.append(server.stop)
        assert server.endpoint_url is not None
        forward = PortForward(self.s3_port, int(server.endpoint_url.rsplit(":", 1)[1])).start()
        self._stops.append(forward.stop)
        endpoint = f"http://127.0.0.1:{self.s3_port}"
        self.state["s3"] = {
            "endpoint": endpoint,
            "server": server.endpoint_url,
            "secret": f"default/{S3_SECRET}",
            "credentialsFile": str(creds_path),
        }
        log.info("S3 at %s (SeaweedFS %s)", endpoint, server.endpoint_url)
        return server

    def _secret(self, cp: Any, s3: Any) -> None:
        from kubetune_cli.localenv.rest import Rest, RestError

        rest = Rest(cp.kubeconfig)
        try:
            body = {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": S3_SECRET, "namespace": "default"},
                "type": "Opaque",
                "stringData": {"AWS_ACCESS_KEY_ID": s3.access_key, "AWS_SECRET_ACCESS_KEY": s3.secret_key},
            }
            try:
                rest.call("POST", "/api/v1/namespaces/default/secrets", body)
            except RestError as e:
                if e.status != 409:
                    raise
        finally:
            rest.close()

    def _operator(self, cp: Any) -> None:
        from kubetune_cli.localenv.processes import ManagedProcess, free_ports, wait_until

        metrics, health, webhook = free_ports(3)
        env = {
            **os.environ,
            "KUBETUNE_METRICS_PORT": str(metrics),
            "KUBETUNE_HEALTH_PORT": str(health),
            "KUBETUNE_WEBHOOK": "true" if self.webhook else "false",
            "KUBETUNE_WEBHOOK_PORT": str(webhook),
            "KUBETUNE_WEBHOOK_ADDR": "127.0.0.1",
            "PYTHONUNBUFFERED": "1",
        }
        env.pop("KUBECONFIG", None)
        proc = ManagedProcess(
            "operator",
            [sys.executable, "-m", "kubetune_operator", "--kubeconfig", str(cp.kubeconfig)],
            self.env.dir / "logs" / "operator.log",
            env=env,
            cwd=self.env.dir,
        )
        self._stops.append(lambda: proc.stop(grace=10.0))
        healthz = f"http://127.0.0.1:{health}/healthz"
        ok = wait_until(lambda: _http_ok(healthz), 120, procs=[proc], interval=0.5)
        if ok and self.webhook:
            ok = wait_until(lambda: self._webhook_registered(cp), 60, procs=[proc], interval=0.5)
        if not ok:
            raise DevEnvError(f"the operator did not become ready:\n{proc.log_tail()}")
        self.state["operator"] = {
            "pid": proc.pid,
            "metrics": f"http://127.0.0.1:{metrics}/metrics",
            "webhook": self.webhook,
        }
        log.info("operator running (pid %d)", proc.pid)

    @staticmethod
    def _webhook_registered(cp: Any) -> bool:
        from kubetune_cli.localenv.rest import Rest, RestError

        rest = Rest(cp.kubeconfig)
        try:
            items = rest.items("/apis/admissionregistration.k8s.io/v1/validatingwebhookconfigurations")
            return any(w.get("clientConfig", {}).get("caBundle") for i in items for w in i.get("webhooks") or [])
        except RestError:
            return False
        finally:
            rest.close()

    def _runtime(self, cp: Any, s3: Any) -> None:
        from kubetune.s3 import make_client as make_s3_client
        from kubetune_cli.localenv.dev_runtime import DevS3, LocalRuntime

        dev_s3 = DevS3(
            self.state["s3"]["endpoint"],
            lambda: make_s3_client(s3.endpoint_url, access_key=s3.access_key, secret_key=s3.secret_key),
        )
        runtime = LocalRuntime(Path(cp.kubeconfig), self.env.dir, s3=dev_s3, pid_dir=self.env.pid_dir).start()
        self._stops.append(runtime.stop)
        log.info("local runtime running (plays KubeRay and the kubelet)")

    def stop(self) -> None:
        while self._stops:
            stop = self._stops.pop()
            try:
                stop()
            except Exception:  # stop the rest anyway
                log.exception("while stopping")


def _http_ok(url: str) -> bool:
    try:
        with urllib.request.urlopen(url, timeout=2) as r:
            return bool(r.status == 200)
    except OSError:
        return False


def serve(argv: list[str] | None = None) -> int:
    """The daemon's main: start everything, wait for SIGTERM/SIGINT, stop everything."""
    p = argparse.ArgumentParser(prog="python -m kubetune_cli.localenv.devenv serve")
    p.add_argument("--dir", required=True)
    p.add_argument("--s3-port", type=int, default=DEFAULT_S3_PORT)
    p.add_argument("--no-webhook", action="store_true")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s")
    env = DevEnv(Path(args.dir))
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    daemon = Daemon(env, args.s3_port, not args.no_webhook)
    try:
        daemon.start()
    except BaseException as e:
        log.exception("start-up failed")
        daemon.state["error"] = f"{type(e).__name__}: {e}".splitlines()[0][:500]
        daemon._write_state()
        daemon.stop()
        return 1
    stop.wait()
    log.info("stopping")
    daemon.stop()
    env.state_file.unlink(missing_ok=True)
    env.pid_file.unlink(missing_ok=True)
    return 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "serve":
        sys.exit(serve(sys.argv[2:]))
    sys.exit("usage: python -m kubetune_cli.localenv.devenv serve --dir DIR [--s3-port PORT]")
