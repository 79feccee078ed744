"""The operator image's Dockerfile: pinned base, only the operator extra (no torch), non-root, the module
entrypoint, and no CLI or dev code (kubetune_cli). (No Docker engine here: the packaging it relies on is checked
by building the wheel from exactly the sources the Dockerfile copies.)"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
DOCKERFILE = ROOT / "images" / "operator" / "Dockerfile"


def test_dockerfile_shape() -> None:
    text = DOCKERFILE.read_text()
    base = re.search(r"^ARG PYTHON_IMAGE=(\S+)$", text, re.M)
    assert base and re.fullmatch(r"python:3\.11\.\d+-slim-\w+", base.group(1)), "base must be pinned by full tag"
    assert ":latest" not in text
    assert re.search(r'pip install --constraint constraints\.txt "\.\[operator\]"', text)
    assert "COPY trainer" not in text
    # Exactly these sources go in: the core and the operator. The CLI and local runtime (cli/) never do.
    sources = {src for line in re.findall(r"^COPY (.+)$", text, re.M) for src in line.split()[:-1]}
    assert sources == {"pyproject.toml", "README.md", "constraints.txt", "kubetune/", "operator/"}, sources
    # and the image's own build step refuses to finish if the dev package could be imported there
    assert "'kubetune_cli'" in re.search(r"find_spec\(m\) is None for m in \(([^)]*)\)", text).group(1)
    assert re.search(r"^USER 10001:10001$", text, re.M)
    assert 'ENTRYPOINT ["python", "-m", "kubetune_operator"]' in text


def test_operator_extra_pulls_no_training_stack() -> None:
    import tomllib

    extras = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["optional-dependencies"]
    names = {re.split(r"[<>=\[ ]", d, maxsplit=1)[0].lower() for d in extras["operator"]}
    assert names & {"torch", "ray", "deepspeed", "transformers"} == set()
    assert {"kopf", "kubernetes"} <= names


@pytest.mark.timeout(300)
def test_wheel_from_the_image_sources_holds_api_and_operator_only(tmp_path: Path) -> None:
    """What the Dockerfile copies (pyproject, README, kubetune/, operator/) builds a wheel without the trainer."""
    src = tmp_path / "src"
    src.mkdir()
    for name in ("pyproject.toml", "constraints.txt"):
        (src / name).write_text((ROOT / name).read_text())
    (src / "README.md").write_text(
        (ROOT / "README.md").read_text() if (ROOT / "README.md").exists() else "# kubetune\n"
    )
    subprocess.run(["cp", "-r", str(ROOT / "kubetune"), str(ROOT / "operator"), str(src)], check=True)
    out = tmp_path / "wheel"
    proc = subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", str(out), str(src)],
        capture_output=True,
        text=True,
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    (wheel,) = out.glob("*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    tops = {n.split("/")[0] for n in names}
    assert {"kubetune", "kubetune_operator"} <= tops
    assert not tops & {"kubetune_trainer", "kubetune_cli"}, tops
    assert not [n for n in names if "/localenv/" in n or n.startswith("kubetune/cli/")]
