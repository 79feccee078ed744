"""scripts/gpu-check.sh without a GPU: its dry run prints the plan and validates every case's trainer config;
the MFU arithmetic is checked against a hand computation."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.unit
REPO = Path(__file__).resolve().parents[2]


def test_dry_run_lists_every_case_with_valid_configs() -> None:
    out = subprocess.run(
        ["bash", str(REPO / "scripts/gpu-check.sh"), "--dry-run", "--gpus", "4"],
        text=True,
        capture_output=True,
        timeout=120,
        env={"PATH": "/usr/bin:/bin", "HOME": "/root", "KUBETUNE_VENV": str(Path(sys.executable).parents[1])},
    )
    assert out.returncode == 0, out.stderr
    for method in ("lora", "full"):
        for zero in (2, 3):
            for gpus in (1, 4):
                assert f"train {method}-zero{zero}-{gpus}gpu:" in out.stdout
    assert "8 trainer configs valid" in out.stdout
    assert "/v1/chat/completions" in out.stdout


def test_mfu_arithmetic() -> None:
    sys.path.insert(0, str(REPO / "scripts"))
    import gpu_check

    cfg = {"num_hidden_layers": 30, "hidden_size": 576}
    # SmolLM2-135M at 1024 tokens: 6N + 12 L H S for full, 4N + 2/3 of the attention term for LoRA.
    assert gpu_check.flops_per_token(cfg, 134_515_008, "full", 1024) == 6 * 134_515_008 + 12 * 30 * 576 * 1024
    assert gpu_check.flops_per_token(cfg, 100, "lora", 1) == 4 * 100 + 12 * 30 * 576 * 2 / 3
    assert gpu_check.peak_tflops("NVIDIA H200") == 989.0
    assert [c["name"] for c in gpu_check.cases(1)] == [
        "lora-zero2-1gpu",
        "full-zero2-1gpu",
        "lora-zero3-1gpu",
        "full-zero3-1gpu",
    ]
