"""The chart against the real kube-apiserver (v1.20 here, RBAC on): every rendered object passes a server-side
dry run, the chart's CRDs are accepted as they are, and helm installs, upgrades and uninstalls a release."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, run

pytestmark = pytest.mark.integration

# Kinds of other projects' CRDs (cert-manager, Prometheus Operator) that the local server does not serve;
# their rendering is checked field by field in test_chart_static.py.
THIRD_PARTY = {
    ("cert-manager.io/v1", "Certificate"),
    ("cert-manager.io/v1", "Issuer"),
    ("monitoring.coreos.com/v1", "ServiceMonitor"),
}


def _served_and_third_party(objects: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], set[tuple[str, str]]]:
    served, skipped = [], set()
    for obj in objects:
        key = (obj["apiVersion"], obj["kind"])
        if key in THIRD_PARTY:
            skipped.add(key)
        else:
            served.append(obj)
    return served, skipped


def _dry_run(kubectl: Path, kubeconfig: Path, objects: list[dict[str, Any]]) -> str:
    stream = yaml.safe_dump_all(objects, sort_keys=False)
    result = run([kubectl, "--kubeconfig", kubeconfig, "apply", "--dry-run=server", "-f", "-"], input=stream)
    assert result.returncode == 0, result.stderr
    return result.stdout


CONFIGS = {
    "defaults": {},
    "namespaced": {"watch": {"namespaces": ["{ns}"]}},
    "webhook-cert-manager": {"webhook": {"enabled": True}, "metrics": {"serviceMonitor": {"enabled": True}}},
    "webhook-secret": {
        "webhook": {
            "enabled": True,
            "certManager": {"enabled": False},
            "existingSecret": "kubetune-tls",
            "caBundle": "Q0EK",
        }
    },
    "leader-election": {"leaderElection": {"enabled": True}, "replicaCount": 2},
    "leader-election-namespaced": {"leaderElection": {"enabled": True}, "watch": {"namespaces": ["{ns}"]}},
    "everything-off": {"rbac": {"create": False}, "serviceAccount": {"create": False}, "metrics": {"enabled": False}},
}


@pytest.mark.parametrize("config", sorted(CONFIGS))
def test_every_rendered_object_passes_server_side_dry_run(
    config: str, render, kubectl: Path, kubeconfig: Path, namespace: str, chart_crds: list[str]
) -> None:
    values = json.loads(json.dumps(CONFIGS[config]).replace("{ns}", namespace))
    objects = render(values, namespace=namespace, release=f"kt-{config}")
    served, skipped = _served_and_third_party(objects)
    out = _dry_run(kubectl, kubeconfig, served)
    for obj in served:
        assert f"{obj['kind'].lower()}" in out.lower() and obj["metadata"]["name"] in out
    expected_skips = (
        {
            ("cert-manager.io/v1", "Certificate"),
            ("cert-manager.io/v1", "Issuer"),
            ("monitoring.coreos.com/v1", "ServiceMonitor"),
        }
        if config == "webhook-cert-manager"
        else set()
    )
    assert skipped == expected_skips


def test_chart_crds_accepted_as_they_are(kubectl: Path, kubeconfig: Path, chart_crds: list[str]) -> None:
    """`helm install` sends charts/kubetune/crds/*.yaml unchanged: the server must take them as they are."""
    for path in sorted((CHART / "crds").glob("*.yaml")):
        result = run(
            [
                kubectl,
                "--kubeconfig",
                kubeconfig,
                "apply",
                "--server-side",
                "--dry-run=server",
                "--force-conflicts",
                "-f",
                path,
            ]
        )
        assert result.returncode == 0, f"{path.name}: {result.stderr}"


def _names(kubectl: Path, kubeconfig: Path, kind: str, namespace: str | None, selector: str) -> set[str]:
    argv = [kubectl, "--kubeconfig", kubeconfig, "get", kind, "-l", selector, "-o", "json"]
    argv += ["-n", namespace] if namespace else []
    result = run(argv)
    assert result.returncode == 0, result.stderr
    return {i["metadata"]["name"] for i in json.loads(result.stdout)["items"]}


def test_helm_install_upgrade_uninstall(
    helm: Path, kubectl: Path, kubeconfig: Path, namespace: str, chart_crds: list[str]
) -> None:
    release = "kt-life"
    selector = f"app.kubernetes.io/instance={release}"
    base = [helm, "--kubeconfig", kubeconfig, "--namespace", namespace]
    # The session has the CRDs already (chart_crds): helm leaves existing CRDs alone and installs the rest.
    result = run([*base, "install", release, CHART, "--wait=hookOnly"], timeout=300)
    assert result.returncode == 0, result.stderr
    assert _names(kubectl, kubeconfig, "deployment", namespace, selector) == {"kt-life-kubetune"}
    assert _names(kubectl, kubeconfig, "serviceaccount", namespace, selector) == {"kt-life-kubetune"}
    assert "kt-life-kubetune" in _names(kubectl, kubeconfig, "clusterrole", None, selector)
    assert _names(kubectl, kubeconfig, "clusterrolebinding", None, selector) == {"kt-life-kubetune"}

    # Switch to a namespaced watch: the ClusterRole(Binding) go, a Role(Binding) appears in the namespace.
    result = run(
        [*base, "upgrade", release, CHART, "--wait=hookOnly", "--set", f"watch.namespaces={{{namespace}}}"], timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert "kt-life-kubetune" not in _names(kubectl, kubeconfig, "clusterrole", None, selector)
    assert _names(kubectl, kubeconfig, "clusterrolebinding", None, selector) == {"kt-life-kubetune-observe"}
    assert _names(kubectl, kubeconfig, "role", namespace, selector) == {"kt-life-kubetune"}
    assert _names(kubectl, kubeconfig, "rolebinding", namespace, selector) == {"kt-life-kubetune"}
    deploy = json.loads(
        run(
            [
                kubectl,
                "--kubeconfig",
                kubeconfig,
                "-n",
                namespace,
                "get",
                "deployment",
                "kt-life-kubetune",
                "-o",
                "json",
            ]
        ).stdout
    )
    env = {e["name"]: e.get("value") for e in deploy["spec"]["template"]["spec"]["containers"][0]["env"]}
    assert env["KUBETUNE_NAMESPACES"] == namespace

    result = run([*base, "uninstall", release, "--wait"], timeout=300)
    assert result.returncode == 0, result.stderr
    for kind, ns in (
        ("deployment", namespace),
        ("serviceaccount", namespace),
        ("service", namespace),
        ("role", namespace),
        ("rolebinding", namespace),
        ("clusterrole", None),
    ):
        assert not _names(kubectl, kubeconfig, kind, ns, selector), kind
    # CRDs stay (helm never deletes what crds/ installed): FineTuneJobs outlive the release.
    crd = run([kubectl, "--kubeconfig", kubeconfig, "get", "crd", "finetunejobs.kubetune.io"])
    assert crd.returncode == 0


def test_examples_gitops_accepted(kubectl: Path, kubeconfig: Path, namespace: str, chart_crds: list[str]) -> None:
    """examples/gitops builds with kustomize and every object of a served kind passes a server-side dry run
    (namespaced ones moved into the test's namespace); the ExternalSecret, a third-party kind, is skipped."""
    root = CHART.parents[1]
    built = run([kubectl, "kustomize", root / "examples" / "gitops" / "fine-tunes"])
    assert built.returncode == 0, built.stderr
    objects = [d for d in yaml.safe_load_all(built.stdout) if d]
    assert sorted(o["kind"] for o in objects) == ["ExternalSecret", "FineTuneJob", "FineTuneJob", "Namespace"]
    served = []
    for obj in objects:
        if obj["kind"] == "ExternalSecret":
            continue
        if "namespace" in obj["metadata"]:
            obj["metadata"]["namespace"] = namespace
        served.append(obj)
    out = _dry_run(kubectl, kubeconfig, served)
    assert out.count("finetunejob.kubetune.io/") == 2
