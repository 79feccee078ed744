"""`kubetune validate` and `kubetune run` on bad manifests: they fail in seconds, naming each bad field with the
very message the admission webhook gives (both call kubetune.api), and start nothing."""

from __future__ import annotations

import copy
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
QUICKSTART = ROOT / "examples" / "quickstart.yaml"


def _kubetune(*args: str, cwd: Path, timeout: float = 60) -> tuple[int, str, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args],
        cwd=cwd,
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    return proc.returncode, proc.stdout + proc.stderr, time.monotonic() - t0


def _set(obj: dict[str, Any], path: str, value: Any) -> dict[str, Any]:
    obj = copy.deepcopy(obj)
    *parents, leaf = path.split(".")
    cur = obj
    for p in parents:
        cur = cur.setdefault(p, {})
    if value is _DELETE:
        cur.pop(leaf, None)
    else:
        cur[leaf] = value
    return obj


_DELETE = object()
BAD = {
    "negative-steps": ("spec.training.maxSteps", -4),
    "unknown-format": ("spec.dataset.format", "tweets"),
    "no-dataset": ("spec.dataset", _DELETE),
    "lora-with-full": ("spec.training.method", "full"),  # the quickstart has lora settings
    "malformed-uri": ("spec.dataset.train", "s3:/not-a-bucket"),
    "inline-keys": ("spec.dataset.secretAccessKey", "hunter2"),
    "wrong-type": ("spec.training.learningRate", "fast"),
    "bad-kind": ("kind", "TrainingJob"),
}


def _webhook_message(obj: dict[str, Any]) -> str:
    """What the admission webhook answers (kubetune_operator.webhook), which calls the same API checks."""
    from kubetune_operator.webhook import admission_errors

    if obj.get("kind") != api.KIND:  # the API server does not even route it to the webhook
        with pytest.raises(api.SpecError) as e:
            api.parse_manifest(obj)
        return str(e.value)
    errors = admission_errors("CREATE", obj, None)
    return "; ".join(m if m.startswith(p) else f"{p}: {m}" for p, m in errors)


def test_quickstart_is_valid(tmp_path: Path) -> None:
    rc, out, _ = _kubetune("validate", str(QUICKSTART), cwd=tmp_path)
    assert rc == 0, out
    assert "default/quickstart is valid" in out


@pytest.mark.parametrize("case", sorted(BAD))
def test_bad_manifest_named_like_the_webhook(case: str, tmp_path: Path) -> None:
    good = yaml.safe_load(QUICKSTART.read_text())
    path, value = BAD[case]
    obj = _set(good, path, value)
    manifest = tmp_path / f"{case}.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    expected = _webhook_message(obj)
    assert expected and path.split(".")[-1] in expected or path == "spec.dataset", expected

    rc, out, _ = _kubetune("validate", str(manifest), cwd=tmp_path)
    assert rc == 2, out
    assert expected in out, f"validate said:\n{out}\nthe webhook says:\n{expected}"


def test_run_refuses_a_bad_manifest_in_seconds_and_starts_nothing(tmp_path: Path) -> None:
    good = yaml.safe_load(QUICKSTART.read_text())
    obj = _set(_set(good, "spec.training.maxSteps", 0), "spec.resources.workers", 0)
    manifest = tmp_path / "bad.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    rc, out, seconds = _kubetune("run", str(manifest), "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert rc == 2, out
    assert seconds < 10, f"took {seconds:.1f}s"
    assert _webhook_message(obj) in out
    assert "spec.training.maxSteps" in out and "spec.resources.workers" in out
    assert not (tmp_path / "runs").exists(), "nothing may start for an invalid manifest"


def test_run_refuses_gpus_on_a_cpu_machine(tmp_path: Path) -> None:
    if Path("/dev/nvidia0").exists():
        pytest.skip("this machine has a GPU")
    obj = _set(yaml.safe_load(QUICKSTART.read_text()), "spec.resources.gpusPerWorker", 1)
    manifest = tmp_path / "gpu.yaml"
    manifest.write_text(yaml.safe_dump(obj))
    rc, out, seconds = _kubetune("run", str(manifest), "--no-serve", "--out", str(tmp_path / "runs"), cwd=tmp_path)
    assert rc == 2 and "spec.resources.gpusPerWorker" in out, out


def test_not_yaml_and_not_a_finetunejob(tmp_path: Path) -> None:
    (tmp_path / "broken.yaml").write_text("spec: [unclosed\n")
    rc, out, _ = _kubetune("validate", str(tmp_path / "broken.yaml"), cwd=tmp_path)
    assert rc == 2 and "not valid YAML" in out
    (tmp_path / "cm.yaml").write_text(
        "apiVersion: v1\nkind: ConfigMap\nmetadata: {name: x}\n---\napiVersion: v1\nkind: Secret\nmetadata: {name: y}\n"
    )
    rc, out, _ = _kubetune("validate", str(tmp_path / "cm.yaml"), cwd=tmp_path)
    assert rc == 2 and "no FineTuneJob" in out
