"""How the operator copes with many FineTuneJobs at once, against a real local API server.

    python benchmarks/operator_scale.py                # 200 jobs
    python benchmarks/operator_scale.py --jobs 1000
    python benchmarks/operator_scale.py --kubeconfig ~/.kube/config --namespace bench   # an existing cluster

What it does: starts etcd + kube-apiserver on loopback (no controller-manager, so that the API server's request
counters see only the operator and this script), installs the FineTuneJob CRD and KubeRay's CRDs, starts the
operator as its own process (`python -m kubetune_operator`), creates N FineTuneJobs from
examples/sequence-classification.yaml at once (8 client threads), and watches RayJobs appear.

What it prints:
- apply -> RayJob created latency, p50 / p99 / max (from the create call returning to the RayJob's ADDED
  event on a watch), and the time until every job's status was written;
- the operator's peak RSS (VmHWM of its process);
- API requests per idle job per minute once everything settled: the API server's `apiserver_request_total`
  (resource requests only, so the scrapes of /metrics themselves do not count) over an idle window, divided
  by jobs and minutes. An operator that polls would show here; an event-driven one shows ~0.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import re
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))  # runnable from a checkout without installing

from kubetune_cli.localenv.kubeclient import api_client  # noqa: E402

# What the operator reads and writes; the API server itself touches endpoints/services/namespaces every few
# seconds (its master-endpoint and namespace upkeep), which the idle figure must not blame on the operator.
KUBETUNE_RESOURCES = {"finetunejobs", "rayjobs", "configmaps", "serviceaccounts", "roles", "rolebindings",
                      "events", "deployments", "secrets", "customresourcedefinitions",
                      "validatingwebhookconfigurations", "mutatingwebhookconfigurations"}
_SAMPLE = re.compile(r'^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$')


def request_counts(api: Any) -> dict[tuple[str, str], float]:
    """apiserver_request_total summed by (verb, resource), resource requests only."""
    resp = api.call_api("/metrics", "GET", auth_settings=["BearerToken"], _preload_content=False)
    text = (resp[0] if isinstance(resp, tuple) else resp).data.decode()
    out: dict[tuple[str, str], float] = {}
    for line in text.splitlines():
        m = _SAMPLE.match(line)
        if not m:
            continue
        labels = dict(re.findall(r'(\w+)="([^"]*)"', m.group("labels")))
        if not labels.get("resource"):
            continue
        key = (labels.get("verb", ""), labels["resource"])
        out[key] = out.get(key, 0.0) + float(m.group("value"))
    return out


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _healthy(port: int) -> bool:
    import urllib.request

    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/healthz", timeout=2) as resp:
            return resp.status == 200
    except OSError:
        return False


def peak_rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


class RayJobWatch(threading.Thread):
    """Records when each RayJob in `namespace` is first seen (ADDED)."""

    def __init__(self, api: Any, namespace: str):
        super().__init__(daemon=True)
        from kubernetes import client, watch

        self._watch = watch.Watch()
        self._custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.seen: dict[str, float] = {}
        self.started = threading.Event()

    def run(self) -> None:
        self.started.set()
        try:
            for ev in self._watch.stream(self._custom.list_namespaced_custom_object, "ray.io", "v1", self.namespace,
                                        "rayjobs", timeout_seconds=3600):
                if ev["type"] == "ADDED":
                    job = ev["object"]["metadata"]["labels"].get("kubetune.io/job", "")
                    self.seen.setdefault(job, time.monotonic())
        except Exception:  # noqa: BLE001 - stopped from outside
            pass

    def stop(self) -> None:
        self._watch.stop()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs to create (default 200)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window for request counting")
    parser.add_argument("--timeout", type=float, default=900.0, help="give up waiting after this many seconds")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a local API server")
    parser.add_argument("--namespace", default="kubetune-bench")
    parser.add_argument("--max-workers", type=int, default=16, help="operator handler threads")
    args = parser.parse_args(argv)

    from kubetune_cli.localenv.control_plane import ControlPlane

    cp = None
    if args.kubeconfig:
        kubeconfig = Path(args.kubeconfig)
    else:
        cp = ControlPlane(controller_manager=False).start()
        kubeconfig = Path(cp.kubeconfig)
        print(f"control plane up in {cp.startup_seconds:.1f} s")
    operator = None
    try:
        from kubetune_cli.localenv.crds import install_crds, install_kuberay_crds

        kr = install_kuberay_crds(kubeconfig)
        install_crds(kubeconfig, [ROOT / "crds" / "finetunejob.yaml"])
        print(f"CRDs installed (KubeRay's schema: {'real' if kr.strict else 'PERMISSIVE stand-in'})")
        api = api_client(kubeconfig)
        from kubernetes import client

        core, custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        try:
            core.create_namespace({"metadata": {"name": args.namespace}}, _preload_content=False)
        except client.ApiException as e:
            if e.status != 409:
                raise

        log = Path(tempfile.mkstemp(prefix="kubetune-operator-", suffix=".log")[1])
        print(f"operator log: {log}")
        health_port = _free_port()
        env = {**os.environ, "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_HEALTH_PORT": str(health_port),
               "KUBETUNE_WEBHOOK": "false",
               "KUBETUNE_MAX_WORKERS": str(args.max_workers),
               "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        with open(log, "wb") as out:
            operator = subprocess.Popen([sys.executable, "-m", "kubetune_operator", "--kubeconfig", str(kubeconfig),
                                         "--log-level", os.environ.get("KUBETUNE_BENCH_LOG_LEVEL", "warning")], stdout=out, stderr=subprocess.STDOUT, env=env,
                                        start_new_session=True)
        # The burst starts once kopf answers its liveness probe (the operator's start-up is not measured).
        t_start = time.monotonic()
        while not _healthy(health_port):
            if operator.poll() is not None or time.monotonic() - t_start > 120:
                raise SystemExit(f"operator did not come up: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        print(f"operator up in {time.monotonic() - t_start:.1f} s")
        time.sleep(2)  # kopf starts its watch streams right after the probe comes up

        watcher = RayJobWatch(api, args.namespace)
        watcher.start()
        watcher.started.wait()
        time.sleep(0.5)
        template = yaml.safe_load((ROOT / "examples" / "sequence-classification.yaml").read_text())
        applied: dict[str, float] = {}

        def create(i: int) -> None:
            body = json.loads(json.dumps(template))
            body["metadata"] = {"name": f"bench-{i:05d}", "namespace": args.namespace}
            custom.create_namespaced_custom_object("kubetune.io", "v1alpha1", args.namespace, "finetunejobs", body,
                                                   _preload_content=False)
            applied[body["metadata"]["name"]] = time.monotonic()

        burst_before = request_counts(api)
        t0 = time.monotonic()
        with concurrent.futures.ThreadPoolExecutor(8) as pool:
            list(pool.map(create, range(args.jobs)))
        t_applied = time.monotonic() - t0
        print(f"created {args.jobs} FineTuneJobs in {t_applied:.1f} s")

        deadline = time.monotonic() + args.timeout
        while len(watcher.seen) < args.jobs and time.monotonic() < deadline:
            if operator.poll() is not None:
                raise SystemExit(f"operator exited: {log.read_text()[-3000:]}")
            time.sleep(0.2)
        all_rayjobs = time.monotonic() - t0
        watcher.stop()
        missing = args.jobs - len(watcher.seen)
        if missing:
            raise SystemExit(f"{missing} RayJobs never appeared within {args.timeout:.0f} s")

        def settled() -> bool:
            items = json.loads(custom.list_namespaced_custom_object(
                "kubetune.io", "v1alpha1", args.namespace, "finetunejobs", _preload_content=False).data)["items"]
            return all((j.get("status") or {}).get("rayJob") and (j.get("status") or {}).get("observedGeneration")
                       and "kubetune.io/last-handled-configuration" in j["metadata"].get("annotations", {})
                       for j in items)

        while not settled() and time.monotonic() < deadline:
            time.sleep(1)
        all_status = time.monotonic() - t0
        time.sleep(5)  # trailing Events and the last watch deliveries

        latencies = [watcher.seen[name] - applied[name] for name in applied]
        before = request_counts(api)
        burst = {k: (before.get(k, 0) - burst_before.get(k, 0)) / args.jobs for k in before
                 if k[1] in KUBETUNE_RESOURCES and before.get(k, 0) - burst_before.get(k, 0) >= args.jobs / 2}
        time.sleep(args.idle_seconds)
        after = request_counts(api)
        delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
        delta = {k: v for k, v in delta.items() if v}
        idle_total = sum(delta.values())
        ours = sum(v for (verb, resource), v in delta.items() if resource in KUBETUNE_RESOURCES)
        per_job_minute = ours / args.jobs / (args.idle_seconds / 60)
        rss = peak_rss_mib(operator.pid)

        print()
        print(f"jobs                                   {args.jobs}")
        print(f"apply -> RayJob created  p50           {statistics.median(latencies) * 1000:8.0f} ms")
        print(f"apply -> RayJob created  p99           {percentile(latencies, 99) * 1000:8.0f} ms")
        print(f"apply -> RayJob created  max           {max(latencies) * 1000:8.0f} ms")
        print(f"all RayJobs created after              {all_rayjobs:8.1f} s")
        print(f"all statuses written after             {all_status:8.1f} s")
        print(f"operator peak RSS                      {rss:8.1f} MiB")
        print(f"API requests per job while creating    {sum(burst.values()):8.1f}  "
              + ", ".join(f"{verb} {res} {n:.1f}" for (verb, res), n in sorted(burst.items())))
        print(f"API requests while idle ({args.idle_seconds:.0f} s), all      {idle_total:8.0f}"
              + (f"  {dict(sorted(delta.items()))}" if delta else ""))
        print(f"  of them on kubetune's resources       {ours:8.0f}  (the rest is the API server's own upkeep)")
        print(f"API requests per idle job per minute   {per_job_minute:8.4f}")
        return 0
    finally:
        if operator is not None and operator.poll() is None:
            os.killpg(operator.pid, signal.SIGTERM)
            try:
                operator.wait(30)
            except subprocess.TimeoutExpired:
                os.killpg(operator.pid, signal.SIGKILL)
        if cp is not None:
            cp.stop()


if __name__ == "__main__":
    sys.exit(main())
