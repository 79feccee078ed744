"""Cutting the data objects into blocks, the units of parallel parsing: a whole object, or a byte range of a big
uncompressed JSONL object.

The cut depends only on the objects (their format and size), never on how many processes parse them, so the
same input always gives the same blocks, and the results (put together in block order) are the same whatever
the parallelism. Gzip, JSON arrays and Parquet are one block per object (a gzip stream cannot be entered
in the middle, nor an array element found without parsing from the start).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from kubetune_trainer.data.readers import SNIFF_BYTES, file_format_of, sniff
from kubetune_trainer.data.s3 import retrying

# Bytes of JSONL per block: a few thousand records, enough to amortise a task and a GET, small enough that a
# file of tens of MB spreads over every worker.
BLOCK_BYTES = 1 << 20


@dataclass(frozen=True)
class Block:
    index: int  # position in the plan: results are put together in this order
    obj: dict[str, Any]  # a listed object (s3.list_objects)
    file_format: str  # the configured fileFormat of its source
    source: int  # the training source's index, or -1 for the validation data
    start: int | None = None  # byte range [start, end) of a JSONL object; None: the whole object
    end: int | None = None

    @property
    def ranged(self) -> bool:
        return self.start is not None


def plan_blocks(
    client: Any, objects: list[dict[str, Any]], file_format: str, source: int, first_index: int, block_bytes: int
) -> list[Block]:
    """The blocks of one source's objects, object after object, numbered from first_index."""
    out: list[Block] = []
    for obj in objects:
        if obj["size"] > block_bytes and _splittable(client, obj, file_format):
            for start in range(0, obj["size"], block_bytes):
                end = min(start + block_bytes, obj["size"])
                out.append(Block(first_index + len(out), obj, file_format, source, start, end))
        else:
            out.append(Block(first_index + len(out), obj, file_format, source))
    return out


def _splittable(client: Any, obj: dict[str, Any], configured: str) -> bool:
    """An uncompressed JSONL object (by its name or, for .json and unknown names, by its first bytes)."""
    fmt = file_format_of(obj["key"], configured)
    if fmt not in ("jsonl", "text") or obj["key"].lower().endswith(".gz"):
        return False
    head = retrying(
        f"reading {obj['uri']}",
        lambda: client.get_object(Bucket=obj["bucket"], Key=obj["key"], Range=f"bytes=0-{SNIFF_BYTES - 1}")[
            "Body"
        ].read(),
    )
    return sniff(head, fmt, obj["uri"]) == "jsonl"
