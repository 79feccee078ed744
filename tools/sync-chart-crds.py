#!/usr/bin/env python3
"""Copy the generated CRDs from crds/ into the Helm chart's crds/ folder, byte for byte.

Why a copy and not a symlink: `helm package` and OCI pushes do not follow links out of the chart, and Argo CD
renders charts from a Git checkout where the chart must be self-contained. tests/chart/test_chart_static.py
fails when the two differ (files listed in CHART_ONLY are the chart's own); run this after `python -m kubetune.crd > crds/finetunejob.yaml`.

    python tools/sync-chart-crds.py          # write
    python tools/sync-chart-crds.py --check  # exit 1 when the chart's copies are stale (CI)
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SOURCE = ROOT / "crds"
TARGET = ROOT / "charts" / "kubetune" / "crds"
# CRDs the chart ships that kubetune.api does not generate (kopf's peering resources, for leader election).
CHART_ONLY = {"kopf-peering.yaml"}


def plan() -> tuple[list[tuple[Path, Path]], list[Path]]:
    """(source, target) pairs to copy, and chart CRD files with no source (to remove)."""
    pairs = [(src, TARGET / src.name) for src in sorted(SOURCE.glob("*.yaml"))]
    wanted = {t.name for _, t in pairs}
    extra = [p for p in sorted(TARGET.glob("*.yaml")) if p.name not in wanted | CHART_ONLY]
    return pairs, extra


def main(argv: list[str]) -> int:
    check = "--check" in argv
    pairs, extra = plan()
    stale = [t for s, t in pairs if not t.is_file() or t.read_bytes() != s.read_bytes()]
    if check:
        for path in stale + extra:
            print(f"stale: {path.relative_to(ROOT)} (run python tools/sync-chart-crds.py)")
        return 1 if stale or extra else 0
    TARGET.mkdir(parents=True, exist_ok=True)
    for src, dst in pairs:
        if dst in stale:
            dst.write_bytes(src.read_bytes())
            print(f"wrote {dst.relative_to(ROOT)}")
    for path in extra:
        path.unlink()
        print(f"removed {path.relative_to(ROOT)}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
