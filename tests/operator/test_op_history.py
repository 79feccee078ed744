"""A job's history past the Events' TTL, against the real API server with the operator in-process: when the
job fails (the test plays KubeRay), the operator keeps its final conditions and Events in the ConfigMap
`<job>-history` (owned by the job), and `kubetune status` shows them from there."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
from op_support import load_example, wait_for

from kubetune_operator import names
from kubetune_operator.history import CONDITIONS_KEY, EVENTS_KEY, config_map_name
from kubetune_operator.kube import CONFIGMAP, FINETUNEJOB, RAYJOB

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]


def test_failed_job_keeps_conditions_and_events(
    operator: Any,
    kubectl: Any,
    kube: Any,
    kuberay: Any,
    namespace: str,
    kubeconfig: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    ns, job = namespace, "short-lived"
    m = load_example("lora-chat")
    m["metadata"]["name"] = job
    m["spec"]["backoffLimit"] = 0  # the first failure is final
    kubectl.apply(m, ns)
    rj = wait_for("RayJob", lambda: kube.get(RAYJOB, ns, names.ray_job(job)), timeout=45)["metadata"]["name"]
    kuberay.start(ns, rj)
    assert kube.get(CONFIGMAP, ns, config_map_name(job)) is None  # nothing kept while it runs
    kuberay.fail(ns, rj, "Job entrypoint command failed with exit code 3")

    try:
        cm = wait_for("history ConfigMap", lambda: kube.get(CONFIGMAP, ns, config_map_name(job)), timeout=45)
    except AssertionError as e:
        raise AssertionError(f"{e}; job status: {kube.get(FINETUNEJOB, ns, job).get('status')}") from None
    owner = cm["metadata"]["ownerReferences"][0]
    assert owner["uid"] == kube.get(FINETUNEJOB, ns, job)["metadata"]["uid"]  # it goes with the job
    conds = {x["type"]: x for x in json.loads(cm["data"][CONDITIONS_KEY])}
    assert conds["Failed"]["status"] == "True" and "exit code 3" in conds["Failed"]["message"]
    reasons = [e["reason"] for e in json.loads(cm["data"][EVENTS_KEY])]
    assert reasons[0] == "Created" and "Running" in reasons and reasons[-1] == conds["Failed"]["reason"], reasons

    from kubetune_cli.main import main

    monkeypatch.setenv("KUBECONFIG", str(kubeconfig))
    assert main(["status", job, "-n", ns]) == 0
    out = capsys.readouterr().out
    assert "events (kept when the run ended" in out and conds["Failed"]["reason"] in out.split("events (kept")[1]
