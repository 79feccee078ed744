"""Helpers for the operator's integration tests: examples, kubectl, conditions, Events, printer columns."""

from __future__ import annotations

import json
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from tests.support.waiting import free_port, wait_for

__all__ = [
    "EXAMPLES",
    "ROOT",
    "Kubectl",
    "condition",
    "events",
    "first_difference",
    "free_port",
    "get_columns",
    "load_example",
    "wait_for",
]

ROOT = Path(__file__).resolve().parents[2]
EXAMPLES = ROOT / "examples"


def load_example(name: str) -> dict[str, Any]:
    return yaml.safe_load((EXAMPLES / f"{name}.yaml").read_text())


@dataclass
class Kubectl:
    binary: str
    kubeconfig: Path

    def run(
        self, *args: str, input: str | None = None, check: bool = True, timeout: float = 60
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            input=input,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and proc.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({proc.returncode}): {proc.stderr}")
        return proc

    def apply(
        self, manifest: dict[str, Any] | str | Path, namespace: str, check: bool = True
    ) -> subprocess.CompletedProcess[str]:
        if isinstance(manifest, Path):
            return self.run("apply", "-n", namespace, "-f", str(manifest), check=check)
        text = manifest if isinstance(manifest, str) else yaml.safe_dump(manifest)
        return self.run("apply", "-n", namespace, "-f", "-", input=text, check=check)

    def json(self, *args: str) -> Any:
        return json.loads(self.run(*args, "-o", "json").stdout)

    def names(self, kinds: str, namespace: str, selector: str | None = None) -> list[str]:
        args = ["get", kinds, "-n", namespace, "-o", "name"]
        if selector:
            args += ["-l", selector]
        return sorted(self.run(*args).stdout.split())


def first_difference(expected: Any, actual: Any, path: str = "") -> str | None:
    """Where `actual` lacks or differs from something in `expected` (None when expected is a subset).

    Used to detect fields the API server pruned (v1.20 prunes unknown fields silently): server-side defaults
    may add fields, but everything that was sent must come back unchanged.
    """
    if isinstance(expected, dict):
        if not isinstance(actual, dict):
            return f"{path or '.'}: expected an object, got {actual!r}"
        for key, value in expected.items():
            if key not in actual:
                return f"{path}.{key}: missing (pruned?)"
            diff = first_difference(value, actual[key], f"{path}.{key}")
            if diff:
                return diff
        return None
    if isinstance(expected, list):
        if not isinstance(actual, list) or len(actual) != len(expected):
            return f"{path}: expected {len(expected)} items, got {actual!r}"
        for i, (e, a) in enumerate(zip(expected, actual)):
            diff = first_difference(e, a, f"{path}[{i}]")
            if diff:
                return diff
        return None
    return None if expected == actual else f"{path}: expected {expected!r}, got {actual!r}"


def condition(obj: dict[str, Any], type_: str) -> dict[str, Any]:
    for c in (obj.get("status") or {}).get("conditions") or []:
        if c.get("type") == type_:
            return c
    return {}


def events(kubectl: Kubectl, namespace: str, name: str) -> list[tuple[str, str, str]]:
    """(type, reason, message) of the Events about FineTuneJob `name`, oldest first."""
    items = kubectl.json("get", "events", "-n", namespace)["items"]
    mine = [
        e for e in items if e["involvedObject"].get("kind") == "FineTuneJob" and e["involvedObject"].get("name") == name
    ]
    mine.sort(
        key=lambda e: (
            e.get("firstTimestamp") or "",
            e["metadata"].get("creationTimestamp") or "",
            e["metadata"]["resourceVersion"].zfill(20),
        )
    )
    return [(e["type"], e["reason"], e["message"]) for e in mine]


def get_columns(kubectl: Kubectl, namespace: str, name: str) -> dict[str, str]:
    """`kubectl get ftj NAME` as {column: value} (blank cells as '')."""
    out = kubectl.run("get", "ftj", name, "-n", namespace).stdout.splitlines()
    header, row = out[0], out[1]
    starts = [i for i, ch in enumerate(header) if ch != " " and (i == 0 or header[i - 1] == " ")]
    bounds = list(zip(starts, starts[1:] + [None]))
    return {header[a:b].strip(): row[a:b].strip() for a, b in bounds}


def put_s3_secret(kube: Any, namespace: str, key_id: str, secret_key: str, name: str = "s3-credentials") -> None:
    """Create (or overwrite) the Secret `s3-credentials` the examples name (the operator holds a job whose
    credentials Secret or keys are missing: Blocked, SecretNotFound)."""
    from kubetune_operator.kube import KINDS

    data = {"AWS_ACCESS_KEY_ID": key_id, "AWS_SECRET_ACCESS_KEY": secret_key}
    _, created = kube.create(
        {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name, "namespace": namespace}, "stringData": data}
    )
    if not created:
        kube.patch(KINDS[("v1", "Secret")], namespace, name, {"stringData": data})
