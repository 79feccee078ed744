"""The core's client modules without a server: kubeconfig credentials and the bearer-token fix, S3 URIs."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from kubetune import kubeclient, s3
from kubetune.clock import now_rfc3339, parse_rfc3339, rfc3339

pytestmark = pytest.mark.unit


def _kubeconfig(path: Path, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "current-context": "c",
                "clusters": [
                    {"name": "k", "cluster": {"server": "https://127.0.0.1:1", "insecure-skip-tls-verify": True}}
                ],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "c", "context": {"cluster": "k", "user": "u"}}],
            }
        )
    )
    return path


def test_kubeconfig_token_is_sent(tmp_path: Path) -> None:
    """kubernetes==36 alone would send no Authorization header for a kubeconfig token; the fix sends it."""
    from kubernetes import client, config

    path = _kubeconfig(tmp_path / "kubeconfig", "s3cr3t-token")
    bare = client.Configuration()
    config.load_kube_config(config_file=str(path), client_configuration=bare)
    assert "BearerToken" not in bare.auth_settings()  # the bug this works around is still there
    fixed = kubeclient.load_configuration(path)
    assert fixed.auth_settings()["BearerToken"]["value"] == "Bearer s3cr3t-token"
    assert kubeclient.fix_bearer_auth(fixed) is fixed  # idempotent
    with kubeclient.api_client(path) as api:
        assert api.configuration.auth_settings()["BearerToken"]["key"] == "authorization"


def test_no_credentials_is_a_config_error(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from kubernetes import config

    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "absent"))
    monkeypatch.setenv("HOME", str(tmp_path))
    with pytest.raises(config.ConfigException):
        kubeclient.load_configuration(None, default_kubeconfig=False)


def test_as_dict_reads_raw_and_tuple_responses() -> None:
    class Raw:
        def __init__(self, data: bytes) -> None:
            self.data = data

    assert kubeclient.as_dict(Raw(b'{"a": 1}')) == {"a": 1}
    assert kubeclient.as_dict((Raw(b'{"b": 2}'), 200, {})) == {"b": 2}
    assert kubeclient.as_dict(Raw(b"")) == {}


@pytest.mark.parametrize(
    ("uri", "expected"),
    [
        ("s3://bucket/a/b.jsonl", ("bucket", "a/b.jsonl")),
        ("s3://bucket", ("bucket", "")),
        ("s3://bucket/", ("bucket", "")),
    ],
)
def test_s3_uris(uri: str, expected: tuple[str, str]) -> None:
    assert s3.parse_uri(uri) == expected


@pytest.mark.parametrize("uri", ["http://bucket/x", "s3://", "s3:///key", "s3://user@bucket/key", "bucket/key"])
def test_bad_s3_uris_are_refused(uri: str) -> None:
    with pytest.raises(s3.S3UriError):
        s3.parse_uri(uri)


def test_s3_join() -> None:
    assert s3.join_uri("s3://b/run/", "/eval/", "report.json") == "s3://b/run/eval/report.json"


def test_rfc3339_round_trip() -> None:
    now = now_rfc3339()
    assert now.endswith("Z") and len(now) == 20
    assert rfc3339(parse_rfc3339(now)) == now
