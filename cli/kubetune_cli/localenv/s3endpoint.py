"""Which S3 server a local run uses, and the embedded one it starts when the manifest's is not running.

Development tool (`kubetune run`). The rule, applied to the manifest's `spec.dataset.endpoint`:

1. Not a loopback address (or unset: AWS): a real S3 service. It is used as is, with credentials from the
   environment (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY), which stand in for `credentialsSecret`.
2. A loopback address where something answers: used as is, with credentials from the environment, else
   those of kubetune's own local S3 servers (the `kubetune dev` cluster's, an earlier `kubetune run`'s) that
   the server accepts.
3. A loopback address where nothing answers (the quickstart's `http://127.0.0.1:8333` on a fresh machine):
   kubetune starts its embedded SeaweedFS and makes it answer at exactly that address (a port forward), so
   the trainer gets the manifest's endpoint unchanged. Its data and credentials are kept under the kubetune
   cache (`local-s3/`), so built-in models are uploaded once and earlier runs' outputs stay readable.

Built-in samples are seeded, and missing buckets created, only in kubetune's own servers (cases 2 with
kubetune's credentials, and 3): an external S3 is never written to except by the trainer itself.
"""

from __future__ import annotations

import contextlib
import fcntl
import ipaddress
import json
import logging
import os
import secrets
import socket
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

log = logging.getLogger(__name__)

LOCAL_S3_DIR = "local-s3"
LOCAL_S3_DIR_ENV = "KUBETUNE_LOCAL_S3_DIR"  # where the embedded server keeps data and keys (tests: a temp dir)
CREDENTIALS_FILE = "credentials.json"
_CRED_VARS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")


class S3EndpointError(RuntimeError):
    """The endpoint answers but no usable credentials are known for it."""


@dataclass
class S3Target:
    """The S3 a run uses. `endpoint` is what the trainer sees (the manifest's); `direct` what kubetune's own
    client uses (the server itself, skipping a port forward)."""

    endpoint: str | None
    region: str
    credentials: dict[str, str]
    kubetune_owned: bool
    direct: str | None = None
    description: str = ""
    _closers: list[Any] = field(default_factory=list, repr=False)

    def env(self) -> dict[str, str]:
        """Credentials and region for the trainer's environment (what the Secret provides in a pod)."""
        return {**self.credentials, "AWS_DEFAULT_REGION": self.region, "AWS_REGION": self.region}

    def client(self) -> Any:
        from kubetune.s3 import make_client as make_s3_client

        return make_s3_client(
            self.direct or self.endpoint,
            region=self.region,
            access_key=self.credentials.get("AWS_ACCESS_KEY_ID"),
            secret_key=self.credentials.get("AWS_SECRET_ACCESS_KEY"),
            session_token=self.credentials.get("AWS_SESSION_TOKEN"),
        )

    def close(self) -> None:
        while self._closers:
            with contextlib.suppress(Exception):
                self._closers.pop()()


def is_loopback(endpoint: str | None) -> bool:
    if not endpoint:
        return False
    host = urlsplit(endpoint).hostname or ""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def host_port(endpoint: str) -> tuple[str, int]:
    parts = urlsplit(endpoint)
    return parts.hostname or "127.0.0.1", parts.port or (443 if parts.scheme == "https" else 80)


def answers(endpoint: str, timeout: float = 1.0) -> bool:
    """Whether anything accepts TCP connections at the endpoint's address."""
    try:
        with socket.create_connection(host_port(endpoint), timeout=timeout):
            return True
    except OSError:
        return False


def credentials_from_env() -> dict[str, str]:
    return {k: os.environ[k] for k in _CRED_VARS if os.environ.get(k)}


def read_credentials(path: Path) -> dict[str, str] | None:
    try:
        data = json.loads(path.read_text())
        return {"AWS_ACCESS_KEY_ID": data["accessKey"], "AWS_SECRET_ACCESS_KEY": data["secretKey"]}
    except (OSError, ValueError, KeyError):
        return None


def write_credentials(path: Path, access_key: str, secret_key: str) -> None:
    """Store a local server's keys, readable by this user only."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump({"accessKey": access_key, "secretKey": secret_key}, f)


def known_credential_files() -> list[Path]:
    """Where kubetune keeps the keys of its local S3 servers: `kubetune run`'s, then `kubetune dev`'s."""
    from kubetune_cli.localenv.binaries import cache_dir

    files = [local_s3_dir() / CREDENTIALS_FILE]
    dev_dirs = [Path(os.environ["KUBETUNE_DEV_DIR"])] if os.environ.get("KUBETUNE_DEV_DIR") else []
    dev_dirs.append(cache_dir() / "dev")
    files += [d / "s3" / CREDENTIALS_FILE for d in dev_dirs]
    return files


def local_s3_dir() -> Path:
    from kubetune_cli.localenv.binaries import cache_dir

    env = os.environ.get(LOCAL_S3_DIR_ENV)
    return Path(env) if env else cache_dir() / LOCAL_S3_DIR


def _accepts(endpoint: str, region: str, creds: dict[str, str]) -> bool:
    from kubetune.s3 import make_client as make_s3_client

    client = make_s3_client(
        endpoint, region=region, access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"]
    )
    try:
        client.list_buckets()
        return True
    except Exception:  # noqa: BLE001 - wrong keys, or not an S3 server at all
        return False


def resolve(endpoint: str | None, region: str) -> S3Target:
    """Apply the module's rule; starts (and registers for `close()`) the embedded server in case 3."""
    if not is_loopback(endpoint):
        where = endpoint or "AWS S3"
        return S3Target(endpoint, region, credentials_from_env(), False, description=f"{where} (external)")
    assert endpoint is not None
    if answers(endpoint):
        env_creds = credentials_from_env()
        if env_creds:
            return S3Target(endpoint, region, env_creds, False, description=f"{endpoint} (already running)")
        for path in known_credential_files():
            creds = read_credentials(path)
            if creds and _accepts(endpoint, region, creds):
                return S3Target(
                    endpoint, region, creds, True, description=f"{endpoint} (kubetune's local S3, keys in {path})"
                )
        raise S3EndpointError(
            f"{endpoint} answers, but it is not one of kubetune's local S3 servers: set AWS_ACCESS_KEY_ID and "
            "AWS_SECRET_ACCESS_KEY for it, or stop what listens there so that kubetune starts its own"
        )
    return start_embedded(endpoint, region)


def start_embedded(endpoint: str, region: str) -> S3Target:
    """SeaweedFS with kept data and keys, answering at `endpoint` through a port forward."""
    from kubetune_cli.localenv.portforward import PortForward
    from kubetune_cli.localenv.s3_server import S3Server

    root = local_s3_dir()
    lock = _try_lock(root / ".lock")
    if lock is None:
        # Another run holds the kept data dir (on another endpoint port): use a throw-away one.
        log.warning("kubetune's local S3 data is in use by another run; this run's S3 data is temporary")
        data_dir, creds_path = None, None
    else:
        data_dir, creds_path = root, root / CREDENTIALS_FILE
    creds = read_credentials(creds_path) if creds_path else None
    if creds is None:
        creds = {"AWS_ACCESS_KEY_ID": "kt" + secrets.token_hex(8), "AWS_SECRET_ACCESS_KEY": secrets.token_urlsafe(30)}
        if creds_path:
            write_credentials(creds_path, creds["AWS_ACCESS_KEY_ID"], creds["AWS_SECRET_ACCESS_KEY"])
    server = S3Server(data_dir, access_key=creds["AWS_ACCESS_KEY_ID"], secret_key=creds["AWS_SECRET_ACCESS_KEY"])
    target = S3Target(endpoint, region, creds, True, description=f"{endpoint} (embedded SeaweedFS)")
    if lock is not None:
        target._closers.append(lock.close)
    try:
        server.start()
        target._closers.append(server.stop)
        assert server.endpoint_url is not None
        host, port = host_port(endpoint)
        forward = PortForward(port, host_port(server.endpoint_url)[1], listen_host=host).start()
        target._closers.append(forward.stop)
    except BaseException:
        target.close()
        raise
    target.direct = server.endpoint_url
    return target


def _try_lock(path: Path) -> IO[str] | None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fh = open(path, "a")  # noqa: SIM115 - held for the run, closed by S3Target.close()
    try:
        fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        fh.close()
        return None
    return fh


@contextlib.contextmanager
def target_for(endpoint: str | None, region: str) -> Iterator[S3Target]:
    target = resolve(endpoint, region)
    try:
        yield target
    finally:
        target.close()
