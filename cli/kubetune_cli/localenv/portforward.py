"""A TCP forwarder on 127.0.0.1: a stable local address for a server whose real port is chosen at random.

Development tool. Why: a manifest names its S3 endpoint (`http://127.0.0.1:8333` in the quickstart), but the
local S3 server takes free ports (several parts of SeaweedFS listen, and test sessions run side by side). The
forwarder plays the Service in front of it: the manifest's address stays fixed, the server's may change.
One thread accepts; each connection gets two pump threads. Plenty for S3 traffic of a local run.
"""

from __future__ import annotations

import contextlib
import logging
import socket
import threading

log = logging.getLogger(__name__)


class PortForwardError(RuntimeError):
    """The listening address is taken."""


class PortForward:
    """Forward connections to `listen_host:listen_port` to `target_host:target_port`; a context manager."""

    def __init__(
        self, listen_port: int, target_port: int, *, listen_host: str = "127.0.0.1", target_host: str = "127.0.0.1"
    ) -> None:
        self.listen = (listen_host, listen_port)
        self.target = (target_host, target_port)
        self._sock: socket.socket | None = None
        self._thread: threading.Thread | None = None
        self._stopping = threading.Event()

    def __enter__(self) -> PortForward:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> PortForward:
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            sock.bind(self.listen)
        except OSError as e:
            sock.close()
            raise PortForwardError(f"cannot listen on {self.listen[0]}:{self.listen[1]}: {e.strerror}") from None
        sock.listen(64)
        sock.settimeout(0.5)
        self._sock = sock
        self._thread = threading.Thread(target=self._accept, name=f"forward-{self.listen[1]}", daemon=True)
        self._thread.start()
        return self

    def _accept(self) -> None:
        assert self._sock is not None
        while not self._stopping.is_set():
            try:
                client, _ = self._sock.accept()
            except TimeoutError:
                continue
            except OSError:
                return
            try:
                upstream = socket.create_connection(self.target, timeout=10)
            except OSError as e:
                log.warning("forward %s -> %s: %s", self.listen[1], self.target[1], e.strerror)
                client.close()
                continue
            for s in (client, upstream):
                s.settimeout(None)
                s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            _Connection(client, upstream).start()

    def stop(self) -> None:
        self._stopping.set()
        if self._sock is not None:
            with contextlib.suppress(OSError):
                self._sock.close()
            self._sock = None
        if self._thread is not None:
            self._thread.join(timeout=2)
            self._thread = None


class _Connection:
    """Two pump threads; the sockets close when both directions have ended."""

    def __init__(self, a: socket.socket, b: socket.socket) -> None:
        self._socks = (a, b)
        self._left = 2
        self._lock = threading.Lock()

    def start(self) -> None:
        a, b = self._socks
        threading.Thread(target=self._pump, args=(a, b), daemon=True).start()
        threading.Thread(target=self._pump, args=(b, a), daemon=True).start()

    def _pump(self, src: socket.socket, dst: socket.socket) -> None:
        try:
            while True:
                data = src.recv(1 << 16)
                if not data:
                    break
                dst.sendall(data)
        except OSError:
            pass
        # Half-close: the other direction may still be sending (a response after the request ended).
        with contextlib.suppress(OSError):
            dst.shutdown(socket.SHUT_WR)
        with self._lock:
            self._left -= 1
            last = self._left == 0
        if last:
            for s in self._socks:
                with contextlib.suppress(OSError):
                    s.close()
