"""Reading a FineTuneJob manifest from a file, with the same field-named errors the cluster gives.

The checks are `kubetune.api.parse_manifest`: the very functions behind the operator and its admission
webhook, so `kubetune validate` / `kubetune run` refuse exactly what `kubectl apply` would be refused, with the
same text ("spec.training.learningRate: Input should be greater than 0; ...").
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from kubetune import api
from kubetune_cli.errors import EXIT_USAGE, CLIError


@dataclass(frozen=True)
class Manifest:
    path: Path
    obj: dict[str, Any]
    name: str
    namespace: str
    spec: api.FineTuneJobSpec


def load(path: str | Path) -> Manifest:
    """Parse and validate the FineTuneJob in `path`; CLIError (exit 2) naming every bad field otherwise."""
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise CLIError(f"{path}: {e.strerror}", EXIT_USAGE) from None
    try:
        docs = [d for d in yaml.safe_load_all(text) if d is not None]
    except yaml.YAMLError as e:
        raise CLIError(f"{path}: not valid YAML: {e}", EXIT_USAGE) from None
    jobs = [d for d in docs if isinstance(d, dict) and d.get("kind") == api.KIND]
    if len(docs) == 1 and not jobs and isinstance(docs[0], dict):
        jobs = docs  # one document of another kind: let parse_manifest name what is wrong with it
    if not jobs:
        raise CLIError(f"{path}: no {api.KIND} in this file", EXIT_USAGE)
    if len(jobs) > 1:
        raise CLIError(f"{path}: {len(jobs)} {api.KIND}s in one file; give one per file", EXIT_USAGE)
    obj = jobs[0]
    try:
        name, namespace, spec = api.parse_manifest(obj)
    except api.SpecError as e:
        label = (obj.get("metadata") or {}).get("name") or "?"
        raise CLIError(f"{path}: {api.KIND} {label!r} is invalid: {e}", EXIT_USAGE) from None
    return Manifest(path=path, obj=obj, name=name, namespace=namespace, spec=spec)
