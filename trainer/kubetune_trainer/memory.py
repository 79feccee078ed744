"""Peak memory of each training rank, for the run's final metrics line (and the throughput benchmark)."""

from __future__ import annotations

import resource
from typing import Any


def peak_memory_mb(device: Any) -> float:
    """This process's peak: GPU memory allocated by torch on a CUDA device, else the peak resident set (host)."""
    import torch

    if getattr(device, "type", "cpu") == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports kilobytes


def all_ranks_peak_mb(device: Any) -> list[float]:
    """Every rank's peak_memory_mb, in rank order (a collective: every rank calls it)."""
    import torch.distributed as dist

    mine = round(peak_memory_mb(device), 1)
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, mine)
    return [float(x) for x in out]
