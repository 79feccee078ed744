"""The local environment really behaves like the production pieces it stands in for.

Each test checks a property later tests rely on: RBAC denies, garbage collection deletes dependants,
KubeRay's schema rejects bad RayJobs, the status subresource takes KubeRay-style patches, S3 has real
semantics and real signature checks.
"""

from __future__ import annotations

import copy
import subprocess
from pathlib import Path
from typing import Any

import pytest

from tests.support.waiting import wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

RAYJOB = {
    "apiVersion": "ray.io/v1",
    "kind": "RayJob",
    "metadata": {"name": "sample"},
    "spec": {
        "entrypoint": "python -c 'print(1)'",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": 60,
        "rayClusterSpec": {
            "rayVersion": "2.60.0",
            "headGroupSpec": {
                "rayStartParams": {"dashboard-host": "0.0.0.0"},
                "template": {
                    "spec": {
                        "containers": [
                            {
                                "name": "ray-head",
                                "image": "rayproject/ray:2.60.0",
                                "resources": {"limits": {"cpu": "1", "memory": "2Gi"}},
                            }
                        ]
                    }
                },
            },
            "workerGroupSpecs": [
                {
                    "groupName": "workers",
                    "replicas": 1,
                    "minReplicas": 1,
                    "maxReplicas": 1,
                    "rayStartParams": {},
                    "template": {
                        "spec": {
                            "containers": [
                                {
                                    "name": "ray-worker",
                                    "image": "rayproject/ray:2.60.0",
                                    "resources": {"limits": {"cpu": "1", "memory": "2Gi", "nvidia.com/gpu": "1"}},
                                }
                            ]
                        }
                    },
                }
            ],
        },
    },
}


def _core(k8s_client: Any) -> Any:
    from kubernetes import client

    return client.CoreV1Api(k8s_client)


def _wait(check: Any, timeout: float, what: str) -> None:
    wait_for(what, check, timeout, interval=0.25)


# --- Kubernetes -----------------------------------------------------------------------------------------


def test_apiserver_answers_as_admin(control_plane: Any, k8s_client: Any) -> None:
    from kubernetes import client

    version = client.VersionApi(k8s_client).get_code()
    # The prebuilt v1.20.2 reports empty major/minor; git_version is the field to read.
    assert version.git_version.startswith("v1.")
    assert control_plane.server.startswith("https://")
    assert Path(control_plane.kubeconfig).is_file()
    names = {ns.metadata.name for ns in _core(k8s_client).list_namespace().items}
    assert {"default", "kube-system"} <= names


def test_rbac_denies_unprivileged_service_account(control_plane: Any, k8s_client: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    from kubetune_cli.localenv.kubeclient import api_client

    sa_kubeconfig = control_plane.kubeconfig_for_service_account(namespace, "nobody")
    with api_client(sa_kubeconfig) as sa_api:
        core = client.CoreV1Api(sa_api)
        with pytest.raises(ApiException) as denied:
            core.list_namespaced_secret(namespace)
        assert denied.value.status == 403
        assert f"system:serviceaccount:{namespace}:nobody" in denied.value.body

        # A Role grants exactly what it says: configmaps yes, secrets still no.
        rbac = client.RbacAuthorizationV1Api(k8s_client)
        rbac.create_namespaced_role(
            namespace,
            {
                "metadata": {"name": "cm-reader"},
                "rules": [{"apiGroups": [""], "resources": ["configmaps"], "verbs": ["list"]}],
            },
        )
        rbac.create_namespaced_role_binding(
            namespace,
            {
                "metadata": {"name": "cm-reader"},
                "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": "cm-reader"},
                "subjects": [{"kind": "ServiceAccount", "name": "nobody", "namespace": namespace}],
            },
        )
        _wait(lambda: _allowed(lambda: core.list_namespaced_config_map(namespace)), 30, "the RoleBinding")
        with pytest.raises(ApiException) as still_denied:
            core.list_namespaced_secret(namespace)
        assert still_denied.value.status == 403


def _allowed(call: Any) -> bool:
    from kubernetes.client.rest import ApiException

    try:
        call()
        return True
    except ApiException as e:
        if e.status != 403:
            raise
        return False


def test_garbage_collector_deletes_dependants(control_plane: Any, k8s_client: Any, namespace: str) -> None:
    from kubernetes.client.rest import ApiException

    if not control_plane.controller_manager and not control_plane.external:
        pytest.skip("needs kube-controller-manager")
    core = _core(k8s_client)
    owner = core.create_namespaced_config_map(namespace, {"metadata": {"name": "owner"}})
    core.create_namespaced_config_map(
        namespace,
        {
            "metadata": {
                "name": "dependant",
                "ownerReferences": [
                    {
                        "apiVersion": "v1",
                        "kind": "ConfigMap",
                        "name": "owner",
                        "uid": owner.metadata.uid,
                    }
                ],
            }
        },
    )
    core.delete_namespaced_config_map("owner", namespace)

    def gone() -> bool:
        try:
            core.read_namespaced_config_map("dependant", namespace)
            return False
        except ApiException as e:
            if e.status == 404:
                return True
            raise

    _wait(gone, 60, "the garbage collector to delete the dependant ConfigMap")


def test_kuberay_rayjob_schema(control_plane: Any, k8s_client: Any, namespace: str) -> None:
    from kubernetes import client
    from kubernetes.client.rest import ApiException

    assert control_plane.kuberay is not None and control_plane.kuberay.strict  # installed by the fixture
    custom = client.CustomObjectsApi(k8s_client)
    created = custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", copy.deepcopy(RAYJOB))
    # v1.20 prunes unknown fields silently (and adds defaults): everything we sent coming back proves every
    # field is in KubeRay's schema. A misspelt field is the counter-example.
    assert _pruned(RAYJOB["spec"], created["spec"]) == []
    typo = copy.deepcopy(RAYJOB)
    typo["metadata"]["name"] = "typo"
    typo["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replcias"] = 2
    created_typo = custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", typo)
    assert _pruned(typo["spec"], created_typo["spec"]) == ["rayClusterSpec.workerGroupSpecs.0.replcias"]

    bad = copy.deepcopy(RAYJOB)
    bad["metadata"]["name"] = "bad"
    bad["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] = "one"
    with pytest.raises(ApiException) as rejected:
        custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", bad)
    assert rejected.value.status == 422
    assert "workerGroupSpecs" in rejected.value.body and "replicas" in rejected.value.body
    assert "integer" in rejected.value.body


def _pruned(sent: Any, got: Any, path: str = "") -> list[str]:
    """Paths of values in `sent` that are absent from (or different in) `got`."""
    if isinstance(sent, dict) and isinstance(got, dict):
        return [
            p
            for k, v in sent.items()
            for p in (_pruned(v, got[k], f"{path}.{k}".lstrip(".")) if k in got else [f"{path}.{k}".lstrip(".")])
        ]
    if isinstance(sent, list) and isinstance(got, list) and len(sent) == len(got):
        return [p for i, (a, b) in enumerate(zip(sent, got, strict=True)) for p in _pruned(a, b, f"{path}.{i}")]
    return [] if sent == got else [path]


def test_rayjob_status_subresource_takes_kuberay_style_patches(k8s_client: Any, namespace: str) -> None:
    from kubernetes import client

    custom = client.CustomObjectsApi(k8s_client)
    custom.create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", copy.deepcopy(RAYJOB))
    status = {"status": {"jobStatus": "RUNNING", "jobDeploymentStatus": "Running", "jobId": "sample-abc"}}
    custom.patch_namespaced_custom_object_status("ray.io", "v1", namespace, "rayjobs", "sample", status)
    got = custom.get_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", "sample")
    assert got["status"]["jobStatus"] == "RUNNING"
    assert got["status"]["jobDeploymentStatus"] == "Running"


def test_kubectl_and_helm_run(kubeconfig: Path) -> None:
    from kubetune_cli.localenv.binaries import find_helm, find_kubectl

    out = subprocess.run(
        [str(find_kubectl()), "--kubeconfig", str(kubeconfig), "get", "crd", "rayjobs.ray.io", "-o", "name"],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 0, out.stderr
    assert "rayjobs.ray.io" in out.stdout
    helm = subprocess.run([str(find_helm()), "version", "--short"], capture_output=True, text=True, timeout=60)
    assert helm.returncode == 0, helm.stderr
    assert helm.stdout.startswith("v")


# --- S3 -------------------------------------------------------------------------------------------------


def test_s3_put_get_list(s3_server: Any) -> None:
    s3 = s3_server.client()
    for i in range(5):
        s3.put_object(Bucket="kubetune-test", Key=f"listing/{i}.txt", Body=f"line {i}\n".encode())
    assert s3.get_object(Bucket="kubetune-test", Key="listing/3.txt")["Body"].read() == b"line 3\n"
    ranged = s3.get_object(Bucket="kubetune-test", Key="listing/3.txt", Range="bytes=5-5")
    assert ranged["Body"].read() == b"3"
    pages = list(
        s3.get_paginator("list_objects_v2").paginate(
            Bucket="kubetune-test", Prefix="listing/", PaginationConfig={"PageSize": 2}
        )
    )
    keys = [o["Key"] for page in pages for o in page.get("Contents", [])]
    assert keys == [f"listing/{i}.txt" for i in range(5)]
    assert len(pages) == 3


def test_s3_multipart_upload(s3_server: Any) -> None:
    s3 = s3_server.client()
    parts_data = [b"a" * (5 * 1024 * 1024), b"b" * (5 * 1024 * 1024), b"tail"]
    upload = s3.create_multipart_upload(Bucket="kubetune-test", Key="multi/blob")
    parts = []
    for number, data in enumerate(parts_data, start=1):
        part = s3.upload_part(
            Bucket="kubetune-test", Key="multi/blob", UploadId=upload["UploadId"], PartNumber=number, Body=data
        )
        parts.append({"PartNumber": number, "ETag": part["ETag"]})
    s3.complete_multipart_upload(
        Bucket="kubetune-test", Key="multi/blob", UploadId=upload["UploadId"], MultipartUpload={"Parts": parts}
    )
    body = s3.get_object(Bucket="kubetune-test", Key="multi/blob")["Body"].read()
    assert body == b"".join(parts_data)


def test_s3_rejects_wrong_credentials(s3_server: Any) -> None:
    from botocore.exceptions import ClientError

    s3_server.client().put_object(Bucket="kubetune-test", Key="secret.txt", Body=b"x")
    wrong_secret = s3_server.client(retries=0, secret_key="not-the-secret")
    unknown_key = s3_server.client(retries=0, access_key="AKIDUNKNOWN", secret_key="whatever")
    anonymous = s3_server.client(retries=0, unsigned=True)
    for client in (wrong_secret, unknown_key, anonymous):
        with pytest.raises(ClientError) as denied:
            client.get_object(Bucket="kubetune-test", Key="secret.txt")
        assert denied.value.response["ResponseMetadata"]["HTTPStatusCode"] in (401, 403)
        with pytest.raises(ClientError):
            client.put_object(Bucket="kubetune-test", Key="intruder.txt", Body=b"x")


# --- failure paths and fallbacks (their own short-lived servers) ----------------------------------------


@pytest.mark.slow
def test_failed_start_reports_logs_and_cleans_up() -> None:
    from kubetune_cli.localenv.control_plane import ControlPlane, ControlPlaneError

    cp = ControlPlane(controller_manager=False, extra_apiserver_args=["--no-such-flag=1"], timeout=60)
    with pytest.raises(ControlPlaneError) as failed:
        cp.start()
    assert "no-such-flag" in str(failed.value)  # the apiserver's own complaint, from its log
    assert cp.workdir is not None and not cp.workdir.exists()
    assert cp._procs == []


@pytest.mark.unit
def test_missing_kuberay_crds_are_an_error(tmp_path: Path) -> None:
    """Without KubeRay's CRD files there is no permissive stand-in: RayJobs must meet KubeRay's own schema."""
    from kubetune_cli.localenv.crds import KubeRayCRDsMissing, install_kuberay_crds

    with pytest.raises(KubeRayCRDsMissing, match="KUBETUNE_SHARED") as err:
        install_kuberay_crds(tmp_path / "no-kubeconfig-needed", kuberay_dir=tmp_path / "no-kuberay-here")
    assert str(tmp_path / "no-kuberay-here") in str(err.value)


def test_builtin_sample_is_seeded_again_when_its_builder_changes(
    s3_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A store seeded by an older kubetune keeps a sample's old records only until that sample's version moves:
    then `seed` builds and uploads it again (and leaves a current one alone)."""
    from kubetune_cli.localenv import builtin, samples

    client = s3_server.client()
    item = builtin.Builtin("dataset", "pydoc-chat")
    builtin.seed(client, [item])
    assert builtin.is_present(client, item)
    assert builtin.seed(client, [item]) == []  # current: nothing uploaded

    monkeypatch.setitem(samples.VERSIONS, "pydoc-chat", 99)
    assert not builtin.is_present(client, item)
    assert builtin.seed(client, [item]) == [item]
    bucket, _, key = item.last_object[len("s3://") :].partition("/")
    assert client.head_object(Bucket=bucket, Key=key)["Metadata"][builtin.VERSION_META] == "99"
    assert builtin.is_present(client, item)
