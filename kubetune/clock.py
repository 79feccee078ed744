"""RFC 3339 timestamps as Kubernetes writes them (UTC, whole seconds, "Z"): now, format and parse."""

from __future__ import annotations

from datetime import UTC, datetime


def now_rfc3339() -> str:
    """The current time, e.g. 2026-12-02T13:45:00Z (conditions' lastTransitionTime, Events, markers)."""
    return rfc3339(datetime.now(UTC))


def rfc3339(t: datetime) -> str:
    """`t` in UTC as an RFC 3339 timestamp with whole seconds (a naive `t` is taken as local time)."""
    return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_rfc3339(value: str) -> datetime:
    """An RFC 3339 timestamp ("Z" or an offset) as an aware datetime."""
    return datetime.fromisoformat(value.replace("Z", "+00:00"))
