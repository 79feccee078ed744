"""Child-process plumbing shared by the control plane and the S3 server.

Why it exists: a test run that fails, times out or is interrupted must not leave etcd, kube-apiserver or
SeaweedFS behind holding ports and memory on a 2-core machine. So every server is started
- in its own process group (so `stop` can kill it together with anything it forked),
- with PR_SET_PDEATHSIG=SIGKILL on Linux (so it dies even when Python itself is SIGKILLed),
- registered in an atexit list (so an interpreter that exits without calling `stop` still cleans up).
PDEATHSIG fires when the *thread* that forked the child exits, so it is only set for children started from
the main thread (pytest fixtures, the CLI); servers started from other threads rely on stop()/atexit.
"""

from __future__ import annotations

import atexit
import contextlib
import ctypes
import ctypes.util
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import IO

_PR_SET_PDEATHSIG = 1

# Resolved before any fork: a preexec_fn must not load libraries or allocate much in the child.
_prctl: Callable[..., int] | None = None
if sys.platform.startswith("linux"):
    try:
        _prctl = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True).prctl
    except (OSError, AttributeError):  # pragma: no cover - exotic libc
        _prctl = None


def _die_with_parent() -> None:
    if _prctl is not None:
        _prctl(_PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)


def free_ports(count: int, host: str = "127.0.0.1") -> list[int]:
    """Return `count` distinct ports that were free on `host` a moment ago.

    All sockets are held open together so the kernel cannot hand out the same port twice; there is still a
    small window before the server binds, which callers cover by retrying a failed start.
    """
    socks: list[socket.socket] = []
    try:
        for _ in range(count):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind((host, 0))
            socks.append(s)
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


_OWNER_FILE = ".kubetune-owner-pid"


def make_workdir(prefix: str) -> Path:
    """A fresh temp dir stamped with our pid; first sweeps same-prefix dirs whose owner died.

    Why: a SIGKILLed test run cannot remove its temp dirs (its servers die with it, via PDEATHSIG, but
    etcd data and logs stay); the next run removes them. Dirs without a stamp, or whose owner lives, stay.
    """
    tmp = Path(tempfile.gettempdir())
    for old in tmp.glob(f"{prefix}*"):
        try:
            pid = int((old / _OWNER_FILE).read_text().strip())
        except (OSError, ValueError):
            continue
        if pid != os.getpid() and not pid_alive(pid):
            shutil.rmtree(old, ignore_errors=True)
    path = Path(tempfile.mkdtemp(prefix=prefix))
    (path / _OWNER_FILE).write_text(str(os.getpid()))
    return path


def pid_alive(pid: int) -> bool:
    """Whether a process with this id exists (one of another user's counts too)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def tail(path: Path, lines: int = 30) -> str:
    """Last `lines` lines of a log file, for error messages that explain why a server did not come up."""
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 64 * 1024))
            data = f.read().decode("utf-8", "replace")
    except OSError as e:
        return f"<no log {path}: {e}>"
    return "\n".join(data.splitlines()[-lines:])


class ManagedProcess:
    """One server process with its log file; `stop()` kills its whole process group."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        log_path: Path,
        env: Mapping[str, str] | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        self._log: IO[bytes] = open(log_path, "ab")  # noqa: SIM115 - lives as long as the process
        self.popen = subprocess.Popen(
            self.argv,
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=dict(env) if env is not None else None,
            cwd=str(cwd) if cwd else None,
            start_new_session=True,
            preexec_fn=_die_with_parent if threading.current_thread() is threading.main_thread() else None,
        )
        _register(self)

    @property
    def pid(self) -> int:
        return self.popen.pid

    def alive(self) -> bool:
        return self.popen.poll() is None

    def log_tail(self, lines: int = 30) -> str:
        return tail(self.log_path, lines)

    def stop(self, grace: float = 5.0) -> None:
        """SIGTERM the process group, SIGKILL whatever is left after `grace` seconds. Idempotent."""
        try:
            if self.alive():
                _signal_group(self.pid, signal.SIGTERM)
                with contextlib.suppress(subprocess.TimeoutExpired):
                    self.popen.wait(timeout=grace)
            # The leader may be gone while children it forked still hold ports: always sweep the group.
            _signal_group(self.pid, signal.SIGKILL)
            with contextlib.suppress(subprocess.TimeoutExpired):
                self.popen.wait(timeout=grace)
        finally:
            with contextlib.suppress(OSError):
                self._log.close()
            _unregister(self)


def _signal_group(pgid: int, sig: int) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pgid, sig)


_live: dict[int, ManagedProcess] = {}
_live_lock = threading.Lock()


def _register(p: ManagedProcess) -> None:
    with _live_lock:
        _live[id(p)] = p


def _unregister(p: ManagedProcess) -> None:
    with _live_lock:
        _live.pop(id(p), None)


@atexit.register
def _stop_all() -> None:
    """Last-resort cleanup at interpreter exit for servers whose owner never called stop()."""
    with _live_lock:
        procs = list(_live.values())
    for p in reversed(procs):
        with contextlib.suppress(Exception):
            p.stop(grace=2.0)


def wait_until(
    check: Callable[[], bool],
    timeout: float,
    procs: Sequence[ManagedProcess] = (),
    interval: float = 0.2,
) -> bool:
    """Poll `check` until it is true; False on timeout. Raises early if one of `procs` exits."""
    deadline = time.monotonic() + timeout
    while True:
        for p in procs:
            if not p.alive():
                raise ProcessExited(p)
        if check():
            return True
        if time.monotonic() >= deadline:
            return False
        time.sleep(interval)


class ProcessExited(RuntimeError):
    """A server exited while we were waiting for it to become ready."""

    def __init__(self, proc: ManagedProcess) -> None:
        self.proc = proc
        super().__init__(
            f"{proc.name} exited with code {proc.popen.returncode}; last log lines ({proc.log_path}):\n"
            f"{proc.log_tail()}"
        )
