"""Killing the operator (SIGKILL, `python -m kubetune_operator` as a process) in the middle of reconciling a
batch of jobs, then starting it again, leaves exactly one of each child per job: names are derived, creates
are idempotent, and RayJobs made before the kill are kept, not replaced.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml
from op_support import load_example, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

JOBS = 40
KINDS = "configmaps,serviceaccounts,roles,rolebindings,rayjobs"


def _start(kubeconfig: Path, log: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "KUBETUNE_METRICS_PORT": "0", "KUBETUNE_HEALTH_PORT": "0", "KUBETUNE_WEBHOOK": "false"}
    with open(log, "ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "kubetune_operator", "--kubeconfig", str(kubeconfig)],
            stdout=out,
            stderr=subprocess.STDOUT,
            env=env,
            start_new_session=True,
        )


def _stop(proc: subprocess.Popen[bytes], sig: int = signal.SIGTERM) -> None:
    if proc.poll() is None:
        os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)


def _rayjobs(kubectl: Any, namespace: str) -> dict[str, str]:
    items = kubectl.json("get", "rayjobs", "-n", namespace)["items"]
    return {i["metadata"]["name"]: i["metadata"]["uid"] for i in items}


def test_kill_mid_reconcile_then_restart_makes_no_duplicates(
    kubeconfig: Path, ftj_crd: str, kubectl: Any, k8s_client: Any, namespace: str, tmp_path: Path
) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(k8s_client)

    def any_rayjob() -> bool:  # fast (one GET), so the kill lands while the batch is still in flight
        resp = custom.list_namespaced_custom_object(
            "ray.io", "v1", namespace, "rayjobs", limit=1, _preload_content=False
        )
        return b'"items":[]' not in resp.data

    docs = []
    for i in range(JOBS):
        m = load_example("sequence-classification")
        m["metadata"]["name"] = f"job-{i:02d}"
        docs.append(m)
    # All jobs exist before the operator starts, so it takes them on at once, many in parallel.
    kubectl.run("apply", "-n", namespace, "-f", "-", input=yaml.safe_dump_all(docs))
    log = tmp_path / "operator.log"
    first = _start(kubeconfig, log)
    try:
        wait_for("the first RayJob", any_rayjob, timeout=120, interval=0.02)
        _stop(first, signal.SIGKILL)
    finally:
        _stop(first, signal.SIGKILL)
    at_kill = _rayjobs(kubectl, namespace)
    configs_at_kill = len(kubectl.names("configmaps", namespace, "kubetune.io/job"))
    assert 0 < len(at_kill) < JOBS, f"not killed mid-batch ({len(at_kill)} RayJobs): {log.read_text()[-2000:]}"

    second = _start(kubeconfig, log)
    try:
        wait_for(f"{JOBS} RayJobs", lambda: len(_rayjobs(kubectl, namespace)) == JOBS, timeout=240, interval=0.5)
        wait_for(
            "every job's status",
            lambda: all(
                (j.get("status") or {}).get("rayJob") for j in kubectl.json("get", "ftj", "-n", namespace)["items"]
            ),
            timeout=120,
            interval=0.5,
        )
    finally:
        _stop(second)

    children = kubectl.json("get", KINDS, "-n", namespace, "-l", "kubetune.io/job")["items"]
    per_job = Counter((c["metadata"]["labels"]["kubetune.io/job"], c["kind"]) for c in children)
    assert len(per_job) == JOBS * 5 and set(per_job.values()) == {1}, per_job
    after = _rayjobs(kubectl, namespace)
    assert all(after[name] == uid for name, uid in at_kill.items()), "a RayJob made before the kill was replaced"
    created_events = [
        e
        for e in kubectl.json("get", "events", "-n", namespace)["items"]
        if e["reason"] == "Created" and "RayJob" in e["message"]
    ]
    # At most one creation per RayJob (an Event can be lost in a kill between the create and its Event).
    assert len(created_events) <= JOBS
    assert configs_at_kill >= len(at_kill)  # the ConfigMap always comes before the RayJob
