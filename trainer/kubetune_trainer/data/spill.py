"""A local, append-only table of fixed-width rows on disk, read back as memory maps.

Preprocessing cannot cut the data into exactly N equal shards (or shuffle across the whole dataset) until it
knows how many sequences there are, and it must not hold them all in memory: rows are appended here as they are
packed, then read back by index when the shards are written.
"""

from __future__ import annotations

import os

import numpy as np


class RowSpill:
    def __init__(self, directory: str, columns: dict[str, tuple[np.dtype, int]]):
        """columns: name -> (dtype, width); width 0 means a scalar per row."""
        os.makedirs(directory, exist_ok=True)
        self.directory = directory
        self.columns = columns
        self.rows = 0
        self._files = {name: open(os.path.join(directory, f"{name}.bin"), "wb") for name in columns}  # noqa: SIM115 - closed by close()

    def append(self, batch: dict[str, np.ndarray]) -> None:
        n = None
        for name, (dtype, width) in self.columns.items():
            arr = np.ascontiguousarray(batch[name], dtype=dtype)
            assert arr.shape[1:] == ((width,) if width else ()), (name, arr.shape)
            n = arr.shape[0] if n is None else n
            assert arr.shape[0] == n
            self._files[name].write(arr.tobytes())
        self.rows += n or 0

    def close(self) -> None:
        for f in self._files.values():
            f.close()

    def read(self) -> dict[str, np.ndarray]:
        """Memory maps of every column (call after close)."""
        out = {}
        for name, (dtype, width) in self.columns.items():
            shape = (self.rows, width) if width else (self.rows,)
            if self.rows == 0:
                out[name] = np.zeros(shape, dtype=dtype)
            else:
                out[name] = np.memmap(os.path.join(self.directory, f"{name}.bin"), dtype=dtype, mode="r", shape=shape)
        return out
