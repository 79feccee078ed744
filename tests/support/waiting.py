"""Polling with a deadline and free loopback ports, for every test that waits on a real server."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from kubetune_cli.localenv.processes import free_ports


def wait_for(what: str, fn: Callable[[], Any], timeout: float = 60.0, interval: float = 0.2) -> Any:
    """Poll `fn` until it returns something truthy and return that; fail naming `what` (and the last value)."""
    deadline = time.monotonic() + timeout
    last: Any = None
    while time.monotonic() < deadline:
        last = fn()
        if last:
            return last
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout:.0f} s waiting for {what}; last value: {last!r}")


def free_port() -> int:
    """A port free on 127.0.0.1 a moment ago (kubetune_cli.localenv.processes.free_ports)."""
    return free_ports(1)[0]
