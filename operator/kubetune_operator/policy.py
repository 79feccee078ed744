"""What a spec change does once training has started.

The policy:

- **Training fields are immutable once the RayJob exists**: `model`, `dataset`, `training`, `tuning`,
  `tracking`, `resources`, `output`. A running (or finished) training run cannot be changed underneath: its checkpoints,
  metrics and exported model all belong to the settings it started with, and KubeRay itself ignores changes to
  a RayJob's cluster spec after the cluster exists. A change is refused by the admission webhook (when
  installed) with a message naming each changed field; without the webhook, the operator leaves the RayJob
  alone, sets the condition `SpecChangeRejected=True` (reason `TrainingFieldsImmutable`, the message naming the
  fields) and posts a Warning Event. Reverting the change clears the condition. To train with new settings,
  create a new FineTuneJob (or delete and re-create this one).
- **Live fields follow the spec at any time**: `suspend`, `activeDeadlineSeconds` and `backoffLimit` are
  patched into the RayJob (KubeRay acts on them while the job runs); `suspend` only when the user changed it
  (Kueue suspends and resumes the RayJob itself, and the operator never undoes that), and `deploy`
  governs serving, which is reconciled separately after training succeeds.
- Before the RayJob exists (e.g. while a spec is invalid) every field may change.

A change counts only if it changes the effective settings: the comparison is between resolved specs (defaults
filled), so writing out a default explicitly is not a change. The hash of the training fields as stored is
kept on the RayJob (annotation `kubetune.io/spec-hash`) and mirrored to `status.specHash`; equal hashes skip
the comparison.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from typing import Any

from kubetune import api

TRAINING_FIELDS = ("model", "dataset", "training", "tuning", "tracking", "resources", "output")
LIVE_FIELDS = ("suspend", "activeDeadlineSeconds", "backoffLimit", "deploy")


def spec_hash(raw_spec: Mapping[str, Any]) -> str:
    """A short, stable hash of the training fields of a wire-format spec."""
    subset = {k: raw_spec[k] for k in TRAINING_FIELDS if k in raw_spec}
    canonical = json.dumps(subset, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _leaf_changes(old: Any, new: Any, path: str) -> list[str]:
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for key in sorted(set(old) | set(new)):
            out.extend(_leaf_changes(old.get(key), new.get(key), f"{path}.{key}"))
        return out
    return [] if old == new else [path]


def training_changes(
    applied: api.FineTuneJobSpec | Mapping[str, Any], new: api.FineTuneJobSpec | Mapping[str, Any]
) -> list[str]:
    """Wire paths (spec.training.learningRate, ...) of training fields that differ between two specs.

    Parsed specs are compared with every default filled in; raw dicts (when a spec does not parse) as given.
    """
    a = applied.wire() if isinstance(applied, api.FineTuneJobSpec) else dict(applied)
    b = new.wire() if isinstance(new, api.FineTuneJobSpec) else dict(new)
    out: list[str] = []
    for field in TRAINING_FIELDS:
        out.extend(_leaf_changes(a.get(field), b.get(field), f"spec.{field}"))
    return out


def rejection_message(fields: list[str], ray_job: str) -> str:
    shown = ", ".join(fields[:10]) + (f" and {len(fields) - 10} more" if len(fields) > 10 else "")
    return (
        f"{shown}: immutable once training has started (RayJob {ray_job}); revert the change, or create a new "
        "FineTuneJob to train with other settings (live fields: suspend, activeDeadlineSeconds, backoffLimit, "
        "deploy)"
    )
