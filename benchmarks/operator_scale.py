"""How the operator copes with many FineTuneJobs at once, side by side with a bare client, on a real API server.

    python benchmarks/operator_scale.py                # 200 jobs
    python benchmarks/operator_scale.py --jobs 1000
    python benchmarks/operator_scale.py --kubeconfig ~/.kube/config --namespace bench   # an existing cluster

What it does: starts etcd + kube-apiserver on loopback (no controller-manager, so that the API server's request
counters see only the operator and this script) and installs the FineTuneJob CRD and KubeRay's CRDs. Then:

1. The bare client: a plain kubernetes-client program, no operator. N FineTuneJobs are created from
   examples/sequence-classification.yaml by 8 client threads; as each is created, one of `--max-workers`
   threads (the operator's handler threads) issues what the operator issues for a new job: the same objects
   from the operator's own builders (ConfigMap, ServiceAccount, Role, RoleBinding, NetworkPolicy, RayJob), the
   status patch and the Event; it runs as its own process, fed the created jobs on stdin. It runs once before
   and once after the operator (namespaces `<namespace>-bare1`, `-bare2`); the ratio uses the mean rate.
   `--rbac-cost` adds a third run without the trainer's ServiceAccount, Role and RoleBinding.
2. The operator (`python -m kubetune_operator`, its own process, watching `<namespace>` only): the same N
   jobs created the same way, and the operator does the rest.
   Both runs are timed by the same watches (RayJob ADDED; FineTuneJob settled = status written with
   observedGeneration and rayJob and, for the operator, kopf's handled-spec annotation: nothing left to do).
3. Idle: API requests on kubetune's resources over `--idle-seconds`, per job per minute.
4. One job applied into the N settled ones, `--singles` times in a row (apply -> RayJob, apply -> settled).

What it prints: the figures, then one line per ratio, `ratio NAME: X (target: Y)`, and per-job slopes
(`slope NAME: X`): how the operator's RSS and the settle time grow with the number of jobs.
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
import uuid
from pathlib import Path
from typing import Any

import yaml

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "operator"))  # runnable from a checkout without installing

from kubetune_cli.localenv.kubeclient import api_client  # noqa: E402

# What the operator reads and writes; the API server itself touches endpoints/services/namespaces every few
# seconds (its master-endpoint and namespace upkeep), which the idle figure must not blame on the operator.
KUBETUNE_RESOURCES = {
    "finetunejobs",
    "rayjobs",
    "configmaps",
    "serviceaccounts",
    "roles",
    "rolebindings",
    "networkpolicies",
    "events",
    "deployments",
    "services",
    "secrets",
    "customresourcedefinitions",
    "validatingwebhookconfigurations",
    "mutatingwebhookconfigurations",
}
HANDLED = "kubetune.io/last-handled-configuration"
CREATE_THREADS = 8
_SAMPLE = re.compile(r"^apiserver_request_total\{(?P<labels>[^}]*)\} (?P<value>[0-9.e+]+)$")


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


def per_job(before: dict, after: dict, jobs: int) -> dict[tuple[str, str], float]:
    """Requests per job on kubetune's resources between two counts (kinds below half a request per job left out)."""
    return {
        k: (after.get(k, 0) - before.get(k, 0)) / jobs
        for k in after
        if k[1] in KUBETUNE_RESOURCES and after.get(k, 0) - before.get(k, 0) >= jobs / 2
    }


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


def proc_mib(pid: int, field: str) -> float:
    """VmRSS / VmHWM (peak) of a process in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def percentile(values: list[float], p: float) -> float:
    ordered = sorted(values)
    k = max(0, min(len(ordered) - 1, round(p / 100 * (len(ordered) - 1))))
    return ordered[k]


def slope(xs: list[float], ys: list[float]) -> float:
    """Least-squares slope of ys over xs."""
    mx, my = statistics.fmean(xs), statistics.fmean(ys)
    var = sum((x - mx) ** 2 for x in xs)
    return sum((x - mx) * (y - my) for x, y in zip(xs, ys)) / var if var else float("nan")


def load_line() -> str:
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} ({os.cpu_count()} CPUs)"


class Watches:
    """When each RayJob first appeared and each FineTuneJob first settled, in one namespace (two watch threads)."""

    def __init__(self, api: Any, namespace: str, *, kopf_annotation: bool):
        from kubernetes import client

        self._custom = client.CustomObjectsApi(api)
        self.namespace = namespace
        self.kopf_annotation = kopf_annotation
        self.ray_seen: dict[str, float] = {}
        self.settled: dict[str, float] = {}
        self._watches: list[Any] = []
        self._ready = threading.Barrier(3)
        for target in (self._rayjobs, self._jobs):
            threading.Thread(target=target, daemon=True).start()
        self._ready.wait()
        time.sleep(0.5)  # the watch requests reach the server

    def _stream(self, group: str, version: str, plural: str) -> Any:
        from kubernetes import watch

        w = watch.Watch()
        self._watches.append(w)
        self._ready.wait()
        return w.stream(
            self._custom.list_namespaced_custom_object, group, version, self.namespace, plural, timeout_seconds=7200
        )

    def _rayjobs(self) -> None:
        try:
            for ev in self._stream("ray.io", "v1", "rayjobs"):
                if ev["type"] == "ADDED":
                    job = ev["object"]["metadata"]["labels"].get("kubetune.io/job", "")
                    self.ray_seen.setdefault(job, time.monotonic())
        except Exception:  # noqa: BLE001 - stopped from outside
            pass

    def _jobs(self) -> None:
        try:
            for ev in self._stream("kubetune.io", "v1alpha1", "finetunejobs"):
                obj = ev["object"]
                if ev["type"] != "DELETED" and self.is_settled(obj):
                    self.settled.setdefault(obj["metadata"]["name"], time.monotonic())
        except Exception:  # noqa: BLE001
            pass

    def is_settled(self, job: dict[str, Any]) -> bool:
        st = job.get("status") or {}
        handled = not self.kopf_annotation or HANDLED in (job["metadata"].get("annotations") or {})
        return bool(st.get("rayJob") and st.get("observedGeneration") and handled)

    def wait(self, names: list[str], deadline: float, alive: Any = lambda: True) -> None:
        while any(n not in self.settled for n in names) and time.monotonic() < deadline:
            if not alive():
                raise SystemExit("the operator exited")
            time.sleep(0.05)
        missing = [n for n in names if n not in self.settled]
        if missing:
            raise SystemExit(f"{len(missing)} jobs (e.g. {missing[0]}) did not settle in time")

    def stop(self) -> None:
        for w in self._watches:
            w.stop()


# ------------------------------------------------------------------------------------- creating the jobs


def job_body(template: dict[str, Any], namespace: str, name: str) -> dict[str, Any]:
    body = json.loads(json.dumps(template))
    body["metadata"] = {"name": name, "namespace": namespace}
    return body


def burst(
    api: Any, template: dict[str, Any], namespace: str, jobs: int, then: Any = None
) -> tuple[dict[str, float], float]:
    """Create `jobs` FineTuneJobs with CREATE_THREADS threads; `then(created body)` runs after each create.

    Returns (name -> monotonic time its create returned, the burst's start)."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    applied: dict[str, float] = {}

    def create(i: int) -> None:
        body = job_body(template, namespace, f"bench-{i:05d}")
        resp = custom.create_namespaced_custom_object(
            "kubetune.io", "v1alpha1", namespace, "finetunejobs", body, _preload_content=False
        )
        applied[body["metadata"]["name"]] = time.monotonic()
        if then is not None:
            then(json.loads(resp.data))

    t0 = time.monotonic()
    with concurrent.futures.ThreadPoolExecutor(CREATE_THREADS) as pool:
        list(pool.map(create, range(jobs)))
    return applied, t0


class BareClient:
    """What the operator does for a new job, as a plain kubernetes-client program: the same objects (from the
    operator's builders), the same status patch and Event, on `workers` threads. No watch, no cache, no kopf."""

    def __init__(self, api: Any, workers: int, skip: frozenset[str] = frozenset()):
        from kubernetes import client

        from kubetune_operator.settings import Settings

        self.core, self.custom = client.CoreV1Api(api), client.CustomObjectsApi(api)
        rbac, net = client.RbacAuthorizationV1Api(api), client.NetworkingV1Api(api)
        self.creates = {
            "ConfigMap": self.core.create_namespaced_config_map,
            "ServiceAccount": self.core.create_namespaced_service_account,
            "Role": rbac.create_namespaced_role,
            "RoleBinding": rbac.create_namespaced_role_binding,
            "NetworkPolicy": net.create_namespaced_network_policy,
        }
        self.settings = Settings()
        self.skip = skip  # kinds left out (--rbac-cost: what the trainer's own identity costs)
        self.pool = concurrent.futures.ThreadPoolExecutor(workers)
        self.futures: list[concurrent.futures.Future] = []

    def submit(self, body: dict[str, Any]) -> None:
        self.futures.append(self.pool.submit(self.handle, body))

    def finish(self) -> None:
        for f in self.futures:
            f.result()
        self.pool.shutdown()

    def handle(self, body: dict[str, Any]) -> None:
        from kubetune import api as kapi
        from kubetune_operator import builders, policy
        from kubetune_operator.meta import Owner
        from kubetune_operator.status import Observation, desired_status, now_rfc3339

        owner, ns = Owner.from_body(body), body["metadata"]["namespace"]
        spec = kapi.parse_spec(body["spec"])
        *children, ray_job = builders.training_children(owner, spec, self.settings, policy.spec_hash(body["spec"]))
        children = [obj for obj in children if obj["kind"] not in self.skip]
        for obj in children:  # ConfigMap, the trainer's ServiceAccount/Role/RoleBinding, the head's NetworkPolicy
            self.creates[obj["kind"]](ns, obj, _preload_content=False)
        ray = json.loads(
            self.custom.create_namespaced_custom_object(
                "ray.io", "v1", ns, "rayjobs", ray_job, _preload_content=False
            ).data
        )
        obs = Observation(
            generation=body["metadata"].get("generation"),
            spec_errors=None,
            ray_job_name=ray["metadata"]["name"],
            ray_job=ray,
            rejected_fields=[],
        )
        self.custom.patch_namespaced_custom_object_status(
            "kubetune.io",
            "v1alpha1",
            ns,
            "finetunejobs",
            owner.name,
            {"status": desired_status({}, obs, now_rfc3339())},
            _content_type="application/merge-patch+json",
            _preload_content=False,
        )
        self.core.create_namespaced_event(
            ns, _event(owner.involved_object(), f"created {len(children) + 1} objects"), _preload_content=False
        )


def _event(involved: dict[str, Any], message: str) -> dict[str, Any]:
    now = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return {
        "apiVersion": "v1",
        "kind": "Event",
        "metadata": {"name": f"{involved['name']}.{uuid.uuid4().hex[:16]}", "namespace": involved["namespace"]},
        "involvedObject": involved,
        "type": "Normal",
        "reason": "Created",
        "message": message,
        "source": {"component": "bare-client"},
        "firstTimestamp": now,
        "lastTimestamp": now,
        "count": 1,
    }


def bare_client_process(kubeconfig: Path, workers: int, skip: frozenset[str]) -> None:
    """The bare client's own program (`--bare-client`): each line on stdin is a FineTuneJob just created (by
    the benchmark's creating threads, as for the operator); it issues that job's requests on `workers` threads."""
    bare = BareClient(_client(kubeconfig, workers), workers, skip)
    for line in sys.stdin:
        bare.submit(json.loads(line))
    bare.finish()


def run_bare(
    api: Any, kubeconfig: Path, template: dict[str, Any], namespace: str, args: argparse.Namespace, skip: str = ""
) -> dict[str, Any]:
    """The bare client's burst in its own namespace and process, timed by the same watches as the operator's."""
    _prepare_namespaces(api, [namespace], template)
    watches = Watches(api, namespace, kopf_annotation=False)
    before = request_counts(api)
    proc = subprocess.Popen(
        [
            sys.executable,
            __file__,
            "--bare-client",
            "--kubeconfig",
            str(kubeconfig),
            "--max-workers",
            str(args.max_workers),
            "--skip-kinds",
            skip,
        ],
        stdin=subprocess.PIPE,
        text=True,
    )
    assert proc.stdin is not None
    lock = threading.Lock()

    def hand_over(body: dict[str, Any]) -> None:
        with lock:
            proc.stdin.write(json.dumps(body) + "\n")
            proc.stdin.flush()

    applied, t0 = burst(api, template, namespace, args.jobs, then=hand_over)
    proc.stdin.close()
    if proc.wait(args.timeout) != 0:
        raise SystemExit("the bare client failed")
    watches.wait(list(applied), time.monotonic() + args.timeout)
    settle = max(watches.settled.values()) - t0
    watches.stop()
    time.sleep(2)
    return {"settle": settle, "per_job": per_job(before, request_counts(api), args.jobs)}


def _client(kubeconfig: Path, workers: int) -> Any:
    """An ApiClient with enough pooled connections for the creating threads and `workers` more."""
    api = api_client(kubeconfig)
    api.configuration.connection_pool_maxsize = CREATE_THREADS + workers + 4
    api.rest_client = type(api.rest_client)(api.configuration)  # the pool size is read when it is made
    return api


# ------------------------------------------------------------------------------------------ the operator


def start_operator(kubeconfig: Path, namespace: str, max_workers: int) -> tuple[subprocess.Popen, Path]:
    """`python -m kubetune_operator` watching `namespace` only, up once kopf answers its liveness probe."""
    log = Path(tempfile.mkstemp(prefix="kubetune-operator-", suffix=".log")[1])
    print(f"operator log: {log}")
    health_port = _free_port()
    env = {
        **os.environ,
        "KUBETUNE_METRICS_PORT": "0",
        "KUBETUNE_HEALTH_PORT": str(health_port),
        "KUBETUNE_WEBHOOK": "false",
        "KUBETUNE_NAMESPACES": namespace,
        "KUBETUNE_MAX_WORKERS": str(max_workers),
        "PYTHONPATH": os.pathsep.join([str(ROOT / "operator"), str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    level = os.environ.get("KUBETUNE_BENCH_LOG_LEVEL", "warning")
    with open(log, "wb") as out:
        proc = subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator", "--kubeconfig", str(kubeconfig), "--log-level", level],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )
    t_start = time.monotonic()
    while not _healthy(health_port):
        if proc.poll() is not None or time.monotonic() - t_start > 120:
            raise SystemExit(f"operator did not come up: {log.read_text()[-3000:]}")
        time.sleep(0.2)
    print(f"operator up in {time.monotonic() - t_start:.1f} s")
    time.sleep(2)  # kopf starts its watch streams right after the probe comes up
    return proc, log


def run_operator(
    api: Any, template: dict[str, Any], namespace: str, proc: subprocess.Popen, args: argparse.Namespace
) -> dict[str, Any]:
    """The operator's burst: RayJob latencies, settle time, requests per job, RSS before and at peak."""
    watches = Watches(api, namespace, kopf_annotation=True)
    rss_before = proc_mib(proc.pid, "VmRSS")
    before = request_counts(api)
    applied, t0 = burst(api, template, namespace, args.jobs)
    print(f"created {args.jobs} FineTuneJobs in {time.monotonic() - t0:.1f} s")
    watches.wait(list(applied), time.monotonic() + args.timeout, alive=lambda: proc.poll() is None)
    settle = max(watches.settled.values()) - t0
    time.sleep(5)  # trailing Events and the last watch deliveries
    return {
        "watches": watches,
        "settle": settle,
        "all_rayjobs": max(watches.ray_seen.values()) - t0,
        "ray_latency": [watches.ray_seen[n] - applied[n] for n in applied],
        "per_job": per_job(before, request_counts(api), args.jobs),
        "rss_before": rss_before,
    }


def idle_requests(api: Any, seconds: float) -> tuple[dict[tuple[str, str], float], float]:
    """(all requests by kind over the window, those on kubetune's resources)."""
    before = request_counts(api)
    time.sleep(seconds)
    after = request_counts(api)
    delta = {k: after.get(k, 0) - before.get(k, 0) for k in set(after) | set(before)}
    delta = {k: v for k, v in delta.items() if v}
    return delta, sum(v for (_, resource), v in delta.items() if resource in KUBETUNE_RESOURCES)


def singles(
    api: Any, template: dict[str, Any], namespace: str, watches: Watches, count: int, proc: subprocess.Popen
) -> tuple[list[float], list[float]]:
    """One job at a time into the settled ones: (apply -> RayJob, apply -> settled) seconds, `count` times."""
    from kubernetes import client

    custom = client.CustomObjectsApi(api)
    to_ray, to_settled = [], []
    for i in range(count):
        name = f"single-{i:03d}"
        t = time.monotonic()
        custom.create_namespaced_custom_object(
            "kubetune.io",
            "v1alpha1",
            namespace,
            "finetunejobs",
            job_body(template, namespace, name),
            _preload_content=False,
        )
        watches.wait([name], t + 120, alive=lambda: proc.poll() is None)
        while name not in watches.ray_seen and time.monotonic() < t + 120:
            time.sleep(0.01)
        to_ray.append(watches.ray_seen[name] - t)
        to_settled.append(watches.settled[name] - t)
    return to_ray, to_settled


def stop_operator(proc: subprocess.Popen | None) -> None:
    if proc is not None and proc.poll() is None:
        os.killpg(proc.pid, signal.SIGTERM)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)


# ------------------------------------------------------------------------------------------------ report


def _ms(seconds: float) -> str:
    return f"{seconds * 1000:8.0f} ms"


def _requests(counts: dict[tuple[str, str], float]) -> str:
    return f"{sum(counts.values()):5.1f}  " + ", ".join(
        f"{verb} {res} {n:.1f}" for (verb, res), n in sorted(counts.items())
    )


def report(
    args: argparse.Namespace,
    bare: list[dict[str, Any]],
    op: dict[str, Any],
    idle: tuple[dict, float],
    single: tuple[list[float], list[float]],
    rss: dict[str, float],
) -> None:
    n = args.jobs
    lat, (to_ray, to_settled) = op["ray_latency"], single
    idle_delta, ours = idle
    per_job_minute = ours / n / (args.idle_seconds / 60)
    bare_rate, op_rate = statistics.fmean(n / b["settle"] for b in bare[:2]), n / op["settle"]
    print()
    print(f"jobs                                      {n}")
    for label, b in zip(
        ("bare client, before the operator", "bare client, after the operator", "bare client without trainer RBAC"),
        bare,
    ):
        print(f"{label + ': settled after':42s}{b['settle']:8.1f} s   ({n / b['settle']:.1f} jobs/s)")
    print(f"bare client: requests per job             {_requests(bare[0]['per_job'])}")
    print(f"operator: all RayJobs created after       {op['all_rayjobs']:8.1f} s")
    print(f"operator: all jobs settled after          {op['settle']:8.1f} s   ({op_rate:.1f} jobs/s)")
    print(
        f"operator: apply -> RayJob  p50 / p99 / max {_ms(statistics.median(lat))} {_ms(percentile(lat, 99))} "
        f"{_ms(max(lat))}"
    )
    print(f"operator: requests per job                {_requests(op['per_job'])}")
    print(
        f"operator: RSS before / after / peak       {rss['before']:6.1f} / {rss['after']:6.1f} / {rss['peak']:6.1f} MiB"
    )
    print(
        f"idle ({args.idle_seconds:.0f} s): requests on kubetune's resources {ours:.0f} of {sum(idle_delta.values()):.0f} "
        f"(the rest is the API server's own upkeep)"
    )
    print(f"idle: requests per job per minute         {per_job_minute:8.4f}")
    print(f"{len(to_ray)} jobs applied into the {n} settled, one at a time:")
    print(
        f"  apply -> RayJob   p50 / p99 / max       {_ms(statistics.median(to_ray))} {_ms(percentile(to_ray, 99))} "
        f"{_ms(max(to_ray))}"
    )
    print(
        f"  apply -> settled  p50 / p99 / max       {_ms(statistics.median(to_settled))} "
        f"{_ms(percentile(to_settled, 99))} {_ms(max(to_settled))}"
    )
    print(load_line())
    print()
    print(f"ratio operator_burst_throughput: {op_rate / bare_rate:.3f} (target: 0.8)")
    print(f"ratio apply_into_settled_p99_vs_100ms: {percentile(to_ray, 99) / 0.1:.3f} (target: < 1.0)")
    print(f"ratio peak_rss_vs_200mib: {rss['peak'] / 200:.3f} (target: < 1.0 at 1000 jobs)")
    if len(bare) > 2:
        print(
            f"ratio bare_throughput_with_vs_without_trainer_rbac: {bare_rate / (n / bare[2]['settle']):.3f} "
            "(target: n/a; what the trainer's own identity costs a burst)"
        )
    print(f"slope rss_per_job_after_settling: {(rss['after'] - rss['before']) * 1024 / n:.1f} KiB/job")
    print(f"slope peak_rss_per_job: {(rss['peak'] - rss['before']) * 1024 / n:.1f} KiB/job")
    print(
        f"slope operator_settle_time_per_job: {op['settle'] * 1000 / n:.2f} ms/job "
        f"(bare client {1000 / bare_rate:.2f} ms/job)"
    )
    print(f"slope idle_requests_per_job_per_minute: {per_job_minute:.4f}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=200, help="FineTuneJobs per burst (default 200)")
    parser.add_argument("--idle-seconds", type=float, default=60.0, help="idle window for request counting")
    parser.add_argument("--singles", type=int, default=20, help="jobs applied one at a time into the settled ones")
    parser.add_argument("--timeout", type=float, default=1800.0, help="give up waiting after this many seconds")
    parser.add_argument("--kubeconfig", help="use this cluster instead of starting a local API server")
    parser.add_argument("--namespace", default="kubetune-bench")
    parser.add_argument("--max-workers", type=int, default=16, help="operator handler threads (and the bare client's)")
    parser.add_argument(
        "--rbac-cost",
        action="store_true",
        help="also run the bare client without the trainer's ServiceAccount, Role and RoleBinding",
    )
    parser.add_argument("--bare-client", action="store_true", help=argparse.SUPPRESS)  # run_bare's own process
    parser.add_argument("--skip-kinds", default="", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.bare_client:
        bare_client_process(
            Path(args.kubeconfig), args.max_workers, frozenset(filter(None, args.skip_kinds.split(",")))
        )
        return 0

    from kubetune_cli.localenv.control_plane import ControlPlane
    from kubetune_cli.localenv.crds import install_crds, install_kuberay_crds

    print(load_line())
    cp, proc = None, None
    if args.kubeconfig:
        kubeconfig = Path(args.kubeconfig)
    else:
        cp = ControlPlane(controller_manager=False).start()
        kubeconfig = Path(cp.kubeconfig)
        print(f"control plane up in {cp.startup_seconds:.1f} s")
    try:
        kr = install_kuberay_crds(kubeconfig)
        install_crds(kubeconfig, [ROOT / "crds" / "finetunejob.yaml"])
        print(f"CRDs installed (KubeRay's schema: {'real' if kr.strict else 'PERMISSIVE stand-in'})")
        api = _client(kubeconfig, args.max_workers)
        template = yaml.safe_load((ROOT / "examples" / "sequence-classification.yaml").read_text())
        _prepare_namespaces(api, [args.namespace], template)

        # The bare client runs before and after the operator (the API server warms up and its store grows):
        # the ratio takes the mean of the two rates.
        bare = [run_bare(api, kubeconfig, template, args.namespace + "-bare1", args)]
        print(f"bare client (before the operator): {args.jobs} jobs settled in {bare[0]['settle']:.1f} s")
        proc, _log = start_operator(kubeconfig, args.namespace, args.max_workers)
        op = run_operator(api, template, args.namespace, proc, args)
        idle = idle_requests(api, args.idle_seconds)
        rss = {"before": op["rss_before"], "after": proc_mib(proc.pid, "VmRSS"), "peak": proc_mib(proc.pid, "VmHWM")}
        single = singles(api, template, args.namespace, op["watches"], args.singles, proc)
        op["watches"].stop()
        bare.append(run_bare(api, kubeconfig, template, args.namespace + "-bare2", args))  # the operator idles
        if args.rbac_cost:
            bare.append(
                run_bare(
                    api, kubeconfig, template, args.namespace + "-bare3", args, skip="ServiceAccount,Role,RoleBinding"
                )
            )
        report(args, bare, op, idle, single, rss)
        return 0
    finally:
        stop_operator(proc)
        if cp is not None:
            cp.stop()


def _prepare_namespaces(api: Any, names: list[str], template: dict[str, Any]) -> None:
    """The namespaces, each with the credentials Secret the jobs name (the operator checks that it exists)."""
    import base64

    from kubernetes import client

    core = client.CoreV1Api(api)
    fake = base64.b64encode(b"benchmark").decode()
    secret = {
        "metadata": {"name": template["spec"]["dataset"]["credentialsSecret"]},
        "data": {"AWS_ACCESS_KEY_ID": fake, "AWS_SECRET_ACCESS_KEY": fake},
    }
    for name in names:
        for create, arguments in (
            (core.create_namespace, ({"metadata": {"name": name}},)),
            (core.create_namespaced_secret, (name, secret)),
        ):
            try:
                create(*arguments, _preload_content=False)
            except client.ApiException as e:
                if e.status != 409:
                    raise


if __name__ == "__main__":
    sys.exit(main())
