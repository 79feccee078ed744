"""S3 access for the trainer (STUB: being written)."""
from __future__ import annotations

from typing import Any


def s3_client(endpoint: str | None, region: str) -> Any:
    raise NotImplementedError


def parse_uri(uri: str) -> tuple[str, str]:
    raise NotImplementedError


def list_objects(client: Any, uri: str) -> list[dict]:
    raise NotImplementedError
