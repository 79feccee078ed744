"""The binary lookup chain: KUBEBUILDER_ASSETS, then the cache, then verified unpacking from shared/."""

from __future__ import annotations

import hashlib
import lzma
from pathlib import Path

import pytest

from kubetune_cli.localenv import binaries as tools

pytestmark = pytest.mark.unit


def _fake_shared(root: Path, name: str, payload: bytes, digest: str | None = None) -> Path:
    bin_dir = root / "envtest" / "bin"
    bin_dir.mkdir(parents=True)
    (bin_dir / f"{name}.xz").write_bytes(lzma.compress(payload))
    (bin_dir / "SHA256SUMS").write_text(f"{digest or hashlib.sha256(payload).hexdigest()}  {name}\n")
    return root


@pytest.fixture
def isolated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path / "cache"))
    monkeypatch.setenv("KUBETUNE_SHARED", str(tmp_path / "shared"))
    monkeypatch.delenv("KUBEBUILDER_ASSETS", raising=False)
    return tmp_path


def test_kubebuilder_assets_come_first(isolated: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assets = isolated / "assets"
    assets.mkdir()
    (assets / "kube-apiserver").write_text("#!/bin/sh\n")
    (assets / "kube-apiserver").chmod(0o755)
    monkeypatch.setenv("KUBEBUILDER_ASSETS", str(assets))
    assert tools.find_kube_component("kube-apiserver", allow_build=False) == assets / "kube-apiserver"


def test_unpacks_prebuilt_into_cache_and_verifies(isolated: Path) -> None:
    _fake_shared(isolated / "shared", "kube-apiserver", b"#!/bin/sh\necho fake\n")
    found = tools.find_kube_component("kube-apiserver", allow_build=False)
    assert found == isolated / "cache" / "bin" / "kube-apiserver"
    assert found.read_bytes() == b"#!/bin/sh\necho fake\n"
    assert tools.find_kube_component("kube-apiserver", allow_build=False) == found  # cached now


def test_refuses_binary_with_wrong_checksum(isolated: Path) -> None:
    _fake_shared(isolated / "shared", "kube-apiserver", b"payload", digest="0" * 64)
    with pytest.raises(tools.ToolNotFound, match="sha256 mismatch"):
        tools.find_kube_component("kube-apiserver", allow_build=False)
    assert not (isolated / "cache" / "bin" / "kube-apiserver").exists()


def test_missing_everything_is_a_clear_error(isolated: Path) -> None:
    with pytest.raises(tools.ToolNotFound, match="kube-controller-manager"):
        tools.find_kube_component("kube-controller-manager", allow_build=False)


def test_etcd_is_found() -> None:
    assert tools.find_etcd().name == "etcd"
