"""The cluster side of `kubetune status/plot/logs`: one FineTuneJob, and the S3 objects of its run.

Which cluster: $KUBECONFIG, else ~/.kube/config, else a running `kubetune dev` environment. S3 keys for a
job's outputs come from the Secret its spec names (`credentialsSecret`, read with the user's own rights),
else from the environment, as the trainer gets them.
"""

from __future__ import annotations

import base64
import contextlib
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune import api, kubeclient, s3
from kubetune_cli.errors import EXIT_ENVIRONMENT, EXIT_USAGE, CLIError


def kubeconfig_path() -> Path:
    env = kubeclient.kubeconfig_from_env()
    if env is not None:
        return env
    default = Path.home() / ".kube" / "config"
    if default.is_file():
        return default
    from kubetune_cli.localenv import devenv

    dev = devenv.DevEnv(devenv.default_dir())
    if dev.running():
        return Path(dev.kubeconfig)
    raise CLIError("no cluster: set KUBECONFIG, or start a local one with `kubetune dev up`", EXIT_ENVIRONMENT)


class Connection:
    def __init__(self, kubeconfig: Path) -> None:
        from kubetune_cli.localenv.kubeclient import current_cluster, load_kubeconfig

        self.kubeconfig = kubeconfig
        self.api = kubeclient.api_client(kubeconfig)
        doc = load_kubeconfig(kubeconfig)
        contexts = {c["name"]: c.get("context", {}) for c in doc.get("contexts") or []}
        self.default_namespace = contexts.get(doc.get("current-context"), {}).get("namespace") or "default"
        current_cluster(doc)  # fails early on a broken kubeconfig

    def close(self) -> None:
        self.api.close()

    def _get(self, path: str) -> dict[str, Any] | None:
        from kubernetes.client.rest import ApiException

        try:
            return kubeclient.call_json(self.api, "GET", path)
        except ApiException as e:
            if e.status == 404:
                return None
            raise CLIError(f"GET {path}: {e.status} {e.reason}") from None
        except Exception as e:  # noqa: BLE001 - connection refused and the like
            raise CLIError(
                f"cannot reach the cluster in {self.kubeconfig}: {type(e).__name__}", EXIT_ENVIRONMENT
            ) from None

    def get_job(self, name: str, namespace: str | None) -> dict[str, Any]:
        ns = namespace or self.default_namespace
        job = self._get(f"/apis/{api.GROUP}/{api.VERSION}/namespaces/{ns}/{api.PLURAL}/{name}")
        if job is None:
            raise CLIError(f"no FineTuneJob {ns}/{name}", EXIT_USAGE)
        return job

    def get(self, path: str) -> dict[str, Any] | None:
        return self._get(path)

    def s3_client(self, job: dict[str, Any]) -> Any:
        spec = api.parse_spec(job.get("spec") or {})
        keys: dict[str, str] = {}
        if spec.dataset.credentials_secret:
            ns = job["metadata"]["namespace"]
            secret = self._get(f"/api/v1/namespaces/{ns}/secrets/{spec.dataset.credentials_secret}")
            data = (secret or {}).get("data") or {}
            keys = {k: base64.b64decode(v).decode() for k, v in data.items() if k.startswith("AWS_")}
        return s3.make_client(
            spec.dataset.endpoint,
            region=spec.dataset.region,
            access_key=keys.get("AWS_ACCESS_KEY_ID"),
            secret_key=keys.get("AWS_SECRET_ACCESS_KEY"),
            session_token=keys.get("AWS_SESSION_TOKEN"),
        )

    @staticmethod
    def run_uri(job: dict[str, Any]) -> str:
        spec = api.parse_spec(job.get("spec") or {})
        meta = job["metadata"]
        return api.run_uri(spec.output.uri, meta["namespace"], meta["name"], meta.get("uid"))

    def read_run_object(self, job: dict[str, Any], rel: str) -> str | None:
        """An object under the job's run prefix (e.g. metrics.jsonl) as text; None when it is not there."""
        from botocore.exceptions import ClientError, EndpointConnectionError

        uri = f"{self.run_uri(job)}/{rel}"
        try:
            body = s3.get_bytes(self.s3_client(job), uri)  # None when the object (or its bucket) is not there
        except ClientError as e:
            raise CLIError(f"{uri}: {s3.error_code(e)}") from None
        except EndpointConnectionError:
            raise CLIError(f"cannot reach the job's S3 endpoint for {uri}", EXIT_ENVIRONMENT) from None
        return None if body is None else body.decode("utf-8", "replace")


@contextlib.contextmanager
def connect() -> Iterator[Connection]:
    conn = Connection(kubeconfig_path())
    try:
        yield conn
    finally:
        conn.close()
