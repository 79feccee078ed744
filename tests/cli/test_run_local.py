"""`kubetune run` for real, small: the operator's RayJob run on a local Ray cluster with the trainer, progress
from the trainer's reports, the loss plot, then vLLM serving the adapter and answering the held-out question.

The S3 here is the session's SeaweedFS, with keys in the environment (the rule for an endpoint that already
answers); the tiny model and 240 fortunes are put there first, since kubetune seeds built-ins only into its
own S3 servers. The embedded-S3 path (a loopback endpoint where nothing answers) is the quickstart's.
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

pytestmark = [pytest.mark.e2e, pytest.mark.slow, pytest.mark.timeout(900)]

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture
def tiny_manifest(s3_server: Any, tmp_path: Path) -> Path:
    from kubetune_cli.localenv import builtin
    from kubetune_cli.localenv.samples import fortune_instructions

    client = s3_server.client()
    builtin.seed(client, [builtin.Builtin("model", "tiny-llama")])
    records = fortune_instructions()[:240]
    client.put_object(
        Bucket="kubetune-test",
        Key="run-cli/fortunes.jsonl",
        Body=("\n".join(json.dumps(r) for r in records) + "\n").encode(),
    )
    manifest = yaml.safe_load((ROOT / "tests" / "e2e" / "tiny-job.yaml").read_text())
    manifest["metadata"]["name"] = "tiny-run"
    manifest["spec"]["dataset"].update(
        train="s3://kubetune-test/run-cli/fortunes.jsonl", endpoint=s3_server.endpoint_url
    )
    manifest["spec"]["output"]["uri"] = "s3://kubetune-test/runs"
    path = tmp_path / "tiny-run.yaml"
    path.write_text(yaml.safe_dump(manifest))
    return path


def test_run_trains_plots_serves_and_answers(tiny_manifest: Path, s3_server: Any, tmp_path: Path) -> None:
    from kubetune_cli.localenv.vllm_server import serving_venv_dir, serving_venv_python

    serve = serving_venv_python() is not None
    env = {**os.environ, **s3_server.env(), "PYTHONUNBUFFERED": "1"}
    args = ["run", str(tiny_manifest), "--out", str(tmp_path / "runs")]
    args += ["--exit-after-query"] if serve else ["--no-serve"]
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", *args],
        env=env,
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=840,
    )
    print(f"kubetune run: {time.monotonic() - t0:.0f}s\n{proc.stdout[-3000:]}")
    run_dir = tmp_path / "runs" / "tiny-run"
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:] + _tail(run_dir / "attempt-1" / "driver.log")
    out = proc.stdout
    assert "S3: " + s3_server.endpoint_url + " (already running)" in out
    assert "tiny-run: step 4/4" in out, "the plain progress lines name the steps"
    assert "trained: succeeded: step 4/4" in out and "held-out " in out
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["trainer"]["exitCode"] == 0 and summary["model"]["kind"] == "adapter"
    assert (run_dir / "loss.png").read_bytes()[:4] == b"\x89PNG"
    uid = (run_dir / "run-uid").read_text().strip()  # each run has its own prefix: <output>/<ns>/<name>/<uid>
    assert summary["runUri"] == f"s3://kubetune-test/runs/default/tiny-run/{uid}"
    assert s3_server.client().head_object(Bucket="kubetune-test", Key=f"runs/default/tiny-run/{uid}/loss.png")
    assert json.loads((run_dir / "config.json").read_text())["reporting"]["kubernetes"] is False
    if not serve:
        pytest.skip(f"trained; serving not tested: the vLLM serving venv is missing ({serving_venv_dir()})")
    assert "answer" in summary["sample"], summary  # a random tiny model may answer with special tokens only
    assert "fine-tuned (tiny):" in out and "base model (tiny-base):" in out
    assert "curl http://127.0.0.1:" in out and "openai.OpenAI(base_url=" in out
    port = int(summary["served"]["url"].rsplit(":", 1)[1].split("/")[0])
    with socket.socket() as s:
        assert s.connect_ex(("127.0.0.1", port)) != 0, "the server must stop when kubetune run exits"


def _tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n--- " + str(path) + " ---\n" + "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return ""
