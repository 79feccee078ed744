"""An exclusive fcntl lock on a file, held across processes (caches filled once per machine by many workers)."""

from __future__ import annotations

import contextlib
import fcntl
from collections.abc import Iterator
from pathlib import Path


@contextlib.contextmanager
def file_lock(path: str | Path, *, blocking: bool = True) -> Iterator[None]:
    """Hold an exclusive lock on `path` (created with its folder if missing) for the `with` block.

    With `blocking=False` a lock held elsewhere raises BlockingIOError at once instead of waiting. The lock
    goes with the process: a killed holder never leaves it taken.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX | (0 if blocking else fcntl.LOCK_NB))
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
