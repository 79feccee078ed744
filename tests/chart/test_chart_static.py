"""The Helm chart, rendered by the real helm binary: lint, defaults, namespaced watch, schema refusals, security
settings, least-privilege RBAC, webhook and metrics wiring, CRDs in sync with crds/. No cluster needed."""

from __future__ import annotations

import json
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from chartlib import CHART, ROOT, HelmError, by_kind, one, run

pytestmark = pytest.mark.unit

NS = "kubetune-system"


# ----------------------------------------------------------------------------------------------- lint


@pytest.mark.parametrize("strict", [False, True], ids=["lint", "lint-strict"])
@pytest.mark.parametrize(
    "values",
    [
        [],
        ["--set", "watch.namespaces={team-a,team-b}"],
        ["--set", "webhook.enabled=true,metrics.serviceMonitor.enabled=true"],
        [
            "--set",
            "webhook.enabled=true,webhook.certManager.enabled=false,webhook.existingSecret=tls,webhook.caBundle=Q0E=",
        ],
        ["--set", "leaderElection.enabled=true,replicaCount=2"],
    ],
    ids=["defaults", "namespaced", "webhook-cert-manager", "webhook-secret", "leader-election"],
)
def test_helm_lint_clean(helm: Path, strict: bool, values: list[str]) -> None:
    argv = [helm, "lint", CHART, "--namespace", NS, *values] + (["--strict"] if strict else [])
    result = run(argv)
    out = result.stdout + result.stderr
    assert result.returncode == 0, out
    assert "0 chart(s) failed" in out
    problems = [line for line in out.splitlines() if line.startswith(("[WARNING]", "[ERROR]"))]
    assert not problems, problems


# ------------------------------------------------------------------------------------------- defaults


def _container(objects: list[dict[str, Any]]) -> dict[str, Any]:
    deploy = one(objects, "Deployment")
    (container,) = deploy["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict[str, Any]) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_defaults_render_cluster_wide(render) -> None:
    objects = render()
    kinds = sorted((o["kind"], o["metadata"]["name"]) for o in objects)
    assert kinds == sorted(
        [
            ("ServiceAccount", "kubetune"),
            ("ClusterRole", "kubetune"),
            ("ClusterRoleBinding", "kubetune"),
            ("ClusterRole", "kubetune-edit"),
            ("ClusterRole", "kubetune-view"),
            ("Service", "kubetune-metrics"),
            ("Deployment", "kubetune"),
        ]
    )
    for obj in objects:
        labels = obj["metadata"]["labels"]
        assert labels["app.kubernetes.io/name"] == "kubetune"
        assert labels["app.kubernetes.io/instance"] == "kubetune"
        assert labels["app.kubernetes.io/managed-by"] == "Helm"
        assert labels["helm.sh/chart"] == "kubetune-0.1.0"
        if obj["kind"] not in ("ClusterRole", "ClusterRoleBinding"):
            assert obj["metadata"]["namespace"] == NS
    binding = one(objects, "ClusterRoleBinding")
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NS}]
    assert binding["roleRef"]["name"] == "kubetune"
    env = _env(_container(objects))
    assert env["KUBETUNE_NAMESPACES"] == ""


def test_release_name_prefixes_everything(render) -> None:
    objects = render(release="prod")
    names = {o["metadata"]["name"] for o in objects}
    assert names == {"prod-kubetune", "prod-kubetune-edit", "prod-kubetune-view", "prod-kubetune-metrics"}


def test_deployment_security_and_probes(render) -> None:
    objects = render()
    deploy = one(objects, "Deployment")
    pod = deploy["spec"]["template"]["spec"]
    assert deploy["spec"]["replicas"] == 1
    assert deploy["spec"]["strategy"] == {"type": "Recreate"}, "two operators must never overlap"
    assert pod["serviceAccountName"] == "kubetune"
    assert pod["securityContext"]["runAsNonRoot"] is True
    assert pod["securityContext"]["runAsUser"] != 0
    assert pod["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    c = _container(objects)
    sc = c["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["runAsNonRoot"] is True
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert "privileged" not in sc
    assert {"name": "tmp", "mountPath": "/tmp"} in c["volumeMounts"], "a writable /tmp on a read-only root"
    ports = {p["name"]: p["containerPort"] for p in c["ports"]}
    assert ports == {"health": 8081, "metrics": 8080}
    for probe in (c["livenessProbe"], c["readinessProbe"]):
        assert probe["httpGet"] == {"path": "/healthz", "port": "health"}
    assert c["resources"]["requests"]["cpu"] and c["resources"]["limits"]["memory"]
    assert c["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"
    assert c["imagePullPolicy"] == "IfNotPresent"


def test_operator_settings_from_env(render) -> None:
    """The chart speaks the operator's settings (kubetune_operator.settings) and every server binds the pod IP."""
    env = _env(_container(render()))
    assert env["POD_IP"] == {"fieldRef": {"fieldPath": "status.podIP"}}
    for var in ("KUBETUNE_METRICS_ADDR", "KUBETUNE_HEALTH_ADDR"):
        assert env[var] == "$(POD_IP)"
    assert env["KUBETUNE_METRICS_PORT"] == "8080"
    assert env["KUBETUNE_HEALTH_PORT"] == "8081"
    assert env["KUBETUNE_WEBHOOK"] == "false"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_INFERENCE_IMAGE"] == "ghcr.io/kubetune/kubetune-inference:0.1.0"
    from kubetune_operator import settings

    plain = {k: v for k, v in env.items() if isinstance(v, str) and "$(" not in v}
    parsed = settings.Settings.from_env(plain)
    assert parsed.trainer_image == env["KUBETUNE_TRAINER_IMAGE"]
    assert parsed.metrics_port == 8080 and parsed.health_port == 8081
    assert parsed.namespaces == ()
    known = set(re.findall(r"KUBETUNE_[A-Z_]+", Path(settings.__file__).read_text()))
    unknown = {k for k in env if k.startswith("KUBETUNE_")} - known
    assert not unknown, f"the chart sets variables the operator does not read: {sorted(unknown)}"


def test_image_registries_and_ray_head_access_reach_the_operator(render) -> None:
    from kubetune_operator import settings

    env = _env(
        _container(
            render(
                {
                    "allowedImageRegistries": ["ghcr.io/kubetune", "registry.example.com"],
                    "rayHeadAccess": {"kuberayNamespace": "ray-system", "operatorNamespaceOnly": True},
                }
            )
        )
    )
    parsed = settings.Settings.from_env({k: v for k, v in env.items() if isinstance(v, str)})
    assert parsed.allowed_image_registries == ("ghcr.io/kubetune", "registry.example.com")
    assert parsed.kuberay_namespace == "ray-system" and parsed.operator_namespace == NS
    defaults = settings.Settings.from_env({k: v for k, v in _env(_container(render())).items() if isinstance(v, str)})
    assert defaults.allowed_image_registries == () and defaults.kuberay_namespace is None
    assert defaults.operator_namespace is None


def test_nothing_binds_all_interfaces(render) -> None:
    for values in (None, {"webhook": {"enabled": True}}):
        assert "0.0.0.0" not in json.dumps(render(values))


def test_image_tag_and_digest(render) -> None:
    digest = "sha256:" + "ab" * 32
    objects = render(
        {
            "image": {"tag": "1.2.3", "digest": digest, "pullPolicy": "Always"},
            "defaultImages": {
                "trainer": {"repository": "registry.example/kt/trainer", "tag": "2.0.0"},
                "inference": {"repository": "registry.example/kt/vllm", "digest": digest},
            },
        }
    )
    c = _container(objects)
    assert c["image"] == f"ghcr.io/kubetune/kubetune-operator:1.2.3@{digest}"
    assert c["imagePullPolicy"] == "Always"
    env = _env(c)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example/kt/trainer:2.0.0"
    assert env["KUBETUNE_INFERENCE_IMAGE"] == f"registry.example/kt/vllm:0.1.0@{digest}"


# -------------------------------------------------------------------------------------------- rbac

EXPECTED_JOB_RULES = [
    (("kubetune.io",), ("finetunejobs",), ("get", "list", "watch", "patch")),
    (("kubetune.io",), ("finetunejobs/status",), ("get", "patch")),
    (("ray.io",), ("rayjobs",), ("get", "list", "watch", "create", "patch")),
    (("",), ("configmaps",), ("get", "list", "watch", "create", "patch", "delete")),
    (("",), ("serviceaccounts",), ("get", "create")),
    (("rbac.authorization.k8s.io",), ("roles", "rolebindings"), ("get", "create")),
    (("apps",), ("deployments",), ("get", "list", "watch", "create", "update", "patch", "delete")),
    (("",), ("services",), ("get", "create", "patch", "delete")),
    (("",), ("secrets",), ("get",)),
    (("networking.k8s.io",), ("networkpolicies",), ("get", "create")),
    (("",), ("events",), ("create", "list")),
]
CLUSTER_ONLY_RULES = [
    (("apiextensions.k8s.io",), ("customresourcedefinitions",), ("get", "list", "watch")),
]


def _rules(role: dict[str, Any]) -> list[tuple[tuple[str, ...], ...]]:
    return [(tuple(r["apiGroups"]), tuple(r["resources"]), tuple(r["verbs"])) for r in role["rules"]]


def _assert_least_privilege(role: dict[str, Any]) -> None:
    for rule in role["rules"]:
        assert "*" not in rule["verbs"] and "*" not in rule["resources"] and "*" not in rule["apiGroups"]
        for verb in ("escalate", "bind", "impersonate", "deletecollection"):
            assert verb not in rule["verbs"], rule
        # PUT only where the operator owns the whole spec (the inference Deployment).
        assert "update" not in rule["verbs"] or rule["resources"] == ["deployments"], rule
        # Secrets: get only (a job's named Secret is checked for its keys); never list or watch them.
        assert "secrets" not in rule["resources"] or rule["verbs"] == ["get"], rule
        for resource in (
            "pods",
            "pods/exec",
            "nodes",
            "clusterroles",
            "clusterrolebindings",
            "validatingwebhookconfigurations",
            "mutatingwebhookconfigurations",
        ):
            assert resource not in rule["resources"], rule


def test_cluster_rbac_is_exactly_what_the_operator_uses(render) -> None:
    role = next(o for o in render() if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "kubetune")
    assert _rules(role) == EXPECTED_JOB_RULES + CLUSTER_ONLY_RULES
    _assert_least_privilege(role)


def test_namespaced_watch_renders_roles_per_namespace(render) -> None:
    objects = render({"watch": {"namespaces": ["team-a", "team-b"]}})
    roles, bindings = by_kind(objects, "Role"), by_kind(objects, "RoleBinding")
    assert sorted(r["metadata"]["namespace"] for r in roles) == ["team-a", "team-b"]
    assert sorted(b["metadata"]["namespace"] for b in bindings) == ["team-a", "team-b"]
    for role in roles:
        assert _rules(role) == EXPECTED_JOB_RULES
        _assert_least_privilege(role)
    for binding in bindings:
        assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NS}]
        assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "kubetune"}
    # Cluster-wide, the operator may only observe namespaces and CRDs (kopf); the rest are the user roles.
    assert sorted(o["metadata"]["name"] for o in by_kind(objects, "ClusterRole")) == [
        "kubetune-edit",
        "kubetune-observe",
        "kubetune-view",
    ]
    observe = next(o for o in by_kind(objects, "ClusterRole") if o["metadata"]["name"] == "kubetune-observe")
    assert _rules(observe) == [
        (("",), ("namespaces",), ("list", "watch")),
        (("apiextensions.k8s.io",), ("customresourcedefinitions",), ("get", "list", "watch")),
    ]
    (binding,) = by_kind(objects, "ClusterRoleBinding")
    assert binding["roleRef"]["name"] == "kubetune-observe"
    assert binding["subjects"] == [{"kind": "ServiceAccount", "name": "kubetune", "namespace": NS}]
    restricted = render({"watch": {"namespaces": ["team-a"]}, "rbac": {"clusterScopedReads": False}})
    assert not by_kind(restricted, "ClusterRoleBinding")
    assert _env(_container(objects))["KUBETUNE_NAMESPACES"] == "team-a,team-b"


def test_aggregated_user_roles(render) -> None:
    objects = render()
    edit = next(o for o in objects if o["metadata"]["name"] == "kubetune-edit")
    view = next(o for o in objects if o["metadata"]["name"] == "kubetune-view")
    assert edit["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-edit"] == "true"
    assert view["metadata"]["labels"]["rbac.authorization.k8s.io/aggregate-to-view"] == "true"
    assert {"finetunejobs/status"} & set(edit["rules"][1]["resources"]) and edit["rules"][1]["verbs"] == ["get"]
    assert render({"rbac": {"aggregateToDefaultRoles": False}}) != render()


def test_rbac_and_serviceaccount_can_be_disabled(render) -> None:
    objects = render({"rbac": {"create": False}, "serviceAccount": {"create": False, "name": "ops"}})
    assert not [
        o
        for o in objects
        if o["kind"] in ("ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding", "ServiceAccount")
    ]
    assert one(objects, "Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "ops"


def test_leader_election(render) -> None:
    objects = render({"leaderElection": {"enabled": True, "name": "kt"}, "replicaCount": 2})
    deploy = one(objects, "Deployment")
    assert deploy["spec"]["replicas"] == 2
    assert "strategy" not in deploy["spec"]
    assert _env(_container(objects))["KUBETUNE_PEERING"] == "kt"
    role = next(o for o in objects if o["kind"] == "ClusterRole" and o["metadata"]["name"] == "kubetune")
    peering = [r for r in role["rules"] if r["apiGroups"] == ["kopf.dev"]]
    assert peering and all(r["resources"] == ["clusterkopfpeerings"] for r in peering)
    assert one(objects, "ClusterKopfPeering")["metadata"]["name"] == "kt"
    namespaced = render({"leaderElection": {"enabled": True}, "watch": {"namespaces": ["a", "b"]}})
    assert sorted(p["metadata"]["namespace"] for p in by_kind(namespaced, "KopfPeering")) == ["a", "b"]
    assert not by_kind(namespaced, "ClusterKopfPeering")
    for role in by_kind(namespaced, "Role"):
        assert [r["resources"] for r in role["rules"] if r["apiGroups"] == ["kopf.dev"]] == [["kopfpeerings"]] * 2


# ------------------------------------------------------------------------------------ metrics, webhook


def test_metrics_service_and_service_monitor(render) -> None:
    objects = render(
        {"metrics": {"serviceMonitor": {"enabled": True, "labels": {"release": "prom"}, "interval": "15s"}}}
    )
    service = next(o for o in by_kind(objects, "Service") if o["metadata"]["name"] == "kubetune-metrics")
    pod_labels = one(objects, "Deployment")["spec"]["template"]["metadata"]["labels"]
    assert all(pod_labels.get(k) == v for k, v in service["spec"]["selector"].items())
    assert service["spec"]["ports"] == [{"name": "metrics", "port": 8080, "targetPort": "metrics", "protocol": "TCP"}]
    monitor = one(objects, "ServiceMonitor")
    assert monitor["apiVersion"] == "monitoring.coreos.com/v1"
    assert monitor["metadata"]["labels"]["release"] == "prom"
    selector = monitor["spec"]["selector"]["matchLabels"]
    assert all(service["metadata"]["labels"].get(k) == v for k, v in selector.items())
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NS]}
    assert monitor["spec"]["endpoints"][0]["port"] == "metrics"
    assert monitor["spec"]["endpoints"][0]["interval"] == "15s"
    # The operator's pod is not selected by the ServiceMonitor's labels (component differs): no double scrape.
    assert pod_labels["app.kubernetes.io/component"] != selector["app.kubernetes.io/component"]


def test_metrics_disabled(render) -> None:
    objects = render({"metrics": {"enabled": False, "serviceMonitor": {"enabled": True}}})
    assert not by_kind(objects, "Service") and not by_kind(objects, "ServiceMonitor")
    c = _container(objects)
    assert _env(c)["KUBETUNE_METRICS_PORT"] == "0"
    assert [p["name"] for p in c["ports"]] == ["health"]


def test_webhook_with_cert_manager(render) -> None:
    objects = render({"webhook": {"enabled": True}})
    vwc = one(objects, "ValidatingWebhookConfiguration")
    cert, issuer = one(objects, "Certificate"), one(objects, "Issuer")
    service = next(o for o in by_kind(objects, "Service") if o["metadata"]["name"] == "kubetune-webhook")
    assert vwc["metadata"]["annotations"]["cert-manager.io/inject-ca-from"] == f"{NS}/{cert['metadata']['name']}"
    (hook,) = vwc["webhooks"]
    assert hook["sideEffects"] == "None" and hook["failurePolicy"] == "Fail"
    assert hook["rules"] == [
        {
            "apiGroups": ["kubetune.io"],
            "apiVersions": ["v1alpha1"],
            "resources": ["finetunejobs"],
            "operations": ["CREATE", "UPDATE"],
            "scope": "Namespaced",
        }
    ]
    assert hook["clientConfig"]["service"]["name"] == service["metadata"]["name"]
    assert "caBundle" not in hook["clientConfig"]
    assert f"kubetune-webhook.{NS}.svc" in cert["spec"]["dnsNames"]
    assert cert["spec"]["issuerRef"]["name"] == issuer["metadata"]["name"]
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "webhook-tls", "secret": {"secretName": cert["spec"]["secretName"]}} in pod["volumes"]
    env = _env(pod["containers"][0])
    assert env["KUBETUNE_WEBHOOK"] == "true"
    assert env["KUBETUNE_WEBHOOK_ADDR"] == "$(POD_IP)"
    assert env["KUBETUNE_WEBHOOK_CERT_DIR"] == "/etc/kubetune/webhook-tls"
    assert service["spec"]["ports"][0]["targetPort"] == "webhook"


def test_webhook_with_external_issuer(render) -> None:
    objects = render(
        {"webhook": {"enabled": True, "certManager": {"issuerRef": {"name": "corp-ca", "kind": "ClusterIssuer"}}}}
    )
    assert not by_kind(objects, "Issuer")
    assert one(objects, "Certificate")["spec"]["issuerRef"] == {"name": "corp-ca", "kind": "ClusterIssuer"}


def test_webhook_with_provided_secret(render) -> None:
    objects = render(
        {
            "webhook": {
                "enabled": True,
                "certManager": {"enabled": False},
                "existingSecret": "kubetune-tls",
                "caBundle": "Q0EK",
            }
        }
    )
    assert not by_kind(objects, "Certificate") and not by_kind(objects, "Issuer")
    vwc = one(objects, "ValidatingWebhookConfiguration")
    assert "annotations" not in vwc["metadata"]
    assert vwc["webhooks"][0]["clientConfig"]["caBundle"] == "Q0EK"
    pod = one(objects, "Deployment")["spec"]["template"]["spec"]
    assert {"name": "webhook-tls", "secret": {"secretName": "kubetune-tls"}} in pod["volumes"]


def test_webhook_path_is_the_operator_handler() -> None:
    """kopf routes admission requests by handler id: the configuration's path must name the operator's handler."""
    from kubetune_operator import webhook

    text = (CHART / "templates" / "_helpers.tpl").read_text()
    path = re.search(r'define "kubetune.webhookPath" -}}\n(\S+)\n', text).group(1)
    source = Path(webhook.__file__).read_text()
    assert f'"{path.lstrip("/")}"' in source, f"handler id {path.lstrip('/')!r} not found in {webhook.__file__}"


# ---------------------------------------------------------------------------------------------- schema


BAD_VALUES = [
    ({"replicaCount": 2}, "/replicaCount"),
    ({"replicaCount": "one"}, "/replicaCount"),
    ({"image": {"pullPolicy": "Sometimes"}}, "/image/pullPolicy"),
    ({"image": {"digest": "latest"}}, "/image/digest"),
    ({"imagePullSecrets": ["regcred"]}, "/imagePullSecrets/0"),
    ({"watch": {"namespaces": "team-a"}}, "/watch/namespaces"),
    ({"watch": {"namespaces": ["Team_A"]}}, "/watch/namespaces/0"),
    ({"metrics": {"port": 70000}}, "/metrics/port"),
    ({"metrics": {"enabled": "yes"}}, "/metrics/enabled"),
    ({"metrics": {"serviceMonitor": {"interval": "often"}}}, "/metrics/serviceMonitor/interval"),
    ({"webhook": {"failurePolicy": "Retry"}}, "/webhook/failurePolicy"),
    ({"webhook": {"timeoutSeconds": 60}}, "/webhook/timeoutSeconds"),
    ({"webhook": {"enabled": True, "certManager": {"enabled": False}}}, "/webhook/existingSecret"),
    (
        {"webhook": {"certManager": {"issuerRef": {"name": "x", "kind": "Vault"}}}},
        "/webhook/certManager/issuerRef/kind",
    ),
    ({"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
    ({"resources": {"limits": {"memory": "lots"}}}, "/resources/limits/memory"),
    ({"defaultImages": {"trainer": {"repository": "Bad Repo"}}}, "/defaultImages/trainer/repository"),
    ({"replicas": 1}, "additional properties 'replicas' not allowed"),
    ({"metrics": {"prot": 9090}}, "additional properties 'prot' not allowed"),
    ({"leaderElection": {"enabled": "true"}}, "/leaderElection/enabled"),
]


@pytest.mark.parametrize(("values", "fragment"), BAD_VALUES, ids=[json.dumps(v) for v, _ in BAD_VALUES])
def test_schema_refuses_wrong_values(render, values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(HelmError) as err:
        render(values)
    assert "values don't meet the specifications of the schema" in str(err.value)
    assert fragment in str(err.value), str(err.value)


def test_schema_refuses_set_strings_for_numbers(helm: Path) -> None:
    result = run([helm, "template", "kubetune", CHART, "--set-string", "metrics.port=8080"])
    assert result.returncode != 0 and "/metrics/port" in result.stderr


def test_schema_is_draft07_and_accepts_defaults() -> None:
    jsonschema = pytest.importorskip("jsonschema")
    schema = json.loads((CHART / "values.schema.json").read_text())
    assert schema["$schema"] == "http://json-schema.org/draft-07/schema#"
    jsonschema.Draft7Validator.check_schema(schema)
    defaults = yaml.safe_load((CHART / "values.yaml").read_text())
    jsonschema.Draft7Validator(schema).validate(defaults)
    # Every default has a schema entry and every schema entry a default (nothing undocumented either way).
    assert set(schema["properties"]) - {"global"} == set(defaults)

    def walk(values: dict[str, Any], node: dict[str, Any], path: str) -> None:
        props = node.get("properties")
        if props is None or node.get("additionalProperties") is not False:
            return
        for key, value in values.items():
            assert key in props, f"{path}.{key} has no schema"
            if isinstance(value, dict):
                walk(value, props[key], f"{path}.{key}")

    walk(defaults, schema, "")


# ---------------------------------------------------------------------------------------------- values


NATIVE_OBJECTS = {"resources", "podSecurityContext", "securityContext"}  # Kubernetes objects, commented as one


def test_every_value_has_a_comment() -> None:
    lines = (CHART / "values.yaml").read_text().splitlines()
    stack: list[tuple[int, str]] = []
    missing = []
    for i, line in enumerate(lines):
        m = re.match(r"^( *)([A-Za-z][\w-]*):", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        inside_native = any(k in NATIVE_OBJECTS for _, k in stack)
        stack.append((indent, key))
        if inside_native:
            continue
        prev = next((lines[j].strip() for j in range(i - 1, -1, -1) if lines[j].strip()), "")
        following = next((ln for ln in lines[i + 1 :] if ln.strip()), "")
        nested_map = line.rstrip().endswith(":") and len(following) - len(following.lstrip()) > indent
        # A group (a map whose keys are commented one by one) needs no comment of its own.
        if not prev.startswith("#") and not (nested_map and key not in NATIVE_OBJECTS):
            missing.append(".".join(k for _, k in stack))
    assert not missing, f"values without a comment: {missing}"


def test_notes_render(helm: Path) -> None:
    result = run(
        [
            helm,
            "install",
            "kubetune",
            CHART,
            "--dry-run=client",
            "--namespace",
            NS,
            "--set",
            "watch.namespaces={team-a}",
        ]
    )
    assert result.returncode == 0, result.stderr
    notes = result.stdout.split("NOTES:", 1)[1]
    assert "reconciles FineTuneJobs in: team-a" in notes
    assert f"kubectl -n {NS} rollout status deployment/kubetune" in notes


# ------------------------------------------------------------------------------------------------ crds


def test_chart_crds_are_the_generated_crds_byte_for_byte() -> None:
    source = sorted(p.name for p in (ROOT / "crds").glob("*.yaml"))
    chart = sorted(p.name for p in (CHART / "crds").glob("*.yaml"))
    assert chart == sorted(source + ["kopf-peering.yaml"]), "the chart's own CRDs: kopf peering only"
    for name in source:
        assert (CHART / "crds" / name).read_bytes() == (ROOT / "crds" / name).read_bytes(), (
            f"charts/kubetune/crds/{name} is stale: run python tools/sync-chart-crds.py"
        )
    check = subprocess.run(
        [sys.executable, str(ROOT / "tools" / "sync-chart-crds.py"), "--check"], capture_output=True, text=True
    )
    assert check.returncode == 0, check.stdout


def test_chart_crds_match_the_api_models() -> None:
    from kubetune import crd

    assert (CHART / "crds" / "finetunejob.yaml").read_text() == crd.render()


def test_include_crds_renders_the_crds(render) -> None:
    names = sorted(o["metadata"]["name"] for o in by_kind(render(crds=True), "CustomResourceDefinition"))
    assert names == ["clusterkopfpeerings.kopf.dev", "finetunejobs.kubetune.io", "kopfpeerings.kopf.dev"]


def test_chart_metadata() -> None:
    meta = yaml.safe_load((CHART / "Chart.yaml").read_text())
    assert meta["apiVersion"] == "v2" and meta["type"] == "application"
    assert re.match(r"^\d+\.\d+\.\d+$", meta["version"])
    assert meta["appVersion"]
    assert meta["kubeVersion"].startswith(">=1.20")
    pyproject = (ROOT / "pyproject.toml").read_text()
    assert f'version = "{meta["appVersion"]}"' in pyproject, "appVersion follows the kubetune release"
