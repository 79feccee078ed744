"""Running a RayJob's entrypoint on this machine, the way KubeRay's submitter runs it on the head pod.

Development tool. KubeRay runs `entrypoint` through a shell on the head node with the pod's environment and
RAY_ADDRESS pointing at the cluster. Here the "image" is this Python environment: `python` in the entrypoint
must be this interpreter (the one with kubetune_trainer installed), so its folder goes first on PATH.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from kubetune_cli.localenv.processes import ManagedProcess

TRAINER_PREFIX = "kubetune-trainer: "  # the trainer's last line says how the run ended


def image_env(base: Mapping[str, str] | None = None) -> dict[str, str]:
    """An environment whose `python` is this interpreter (the local stand-in for the trainer image)."""
    env = dict(os.environ if base is None else base)
    bindir = str(Path(sys.executable).parent)
    env["PATH"] = os.pathsep.join([bindir, env.get("PATH", "/usr/bin:/bin")])
    for var in ("PYTHONHOME",):
        env.pop(var, None)
    env.setdefault("PYTHONUNBUFFERED", "1")
    return env


def start_entrypoint(command: str, env: Mapping[str, str], log_path: Path, cwd: Path) -> ManagedProcess:
    """`/bin/sh -c <command>` in its own process group, output to `log_path`."""
    cwd.mkdir(parents=True, exist_ok=True)
    return ManagedProcess("entrypoint", ["/bin/sh", "-c", command], log_path, env=dict(env), cwd=cwd)


def final_message(log_path: Path, prefix: str = TRAINER_PREFIX) -> str:
    """The trainer's last `kubetune-trainer: ...` line (without the prefix), else the log's last line."""
    try:
        with open(log_path, "rb") as f:
            f.seek(max(0, f.seek(0, os.SEEK_END) - 256 * 1024))
            lines = f.read().decode("utf-8", "replace").splitlines()
    except OSError:
        return ""
    for line in reversed(lines):
        if line.startswith(prefix):
            return line[len(prefix) :].strip()
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")
