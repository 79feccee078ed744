"""Where the training ranks run: `workers` pods x ranks per pod, one Ray Train worker (one rank) per GPU.

On KubeRay each worker pod is a Ray node advertising its GPUs (`num-gpus`) and its CPU limit. Every rank asks
for one GPU and its share of the pod's CPUs, and the placement group packs the bundles (PACK): a pod's
GPUs bound how many ranks land on it, so exactly `gpusPerWorker` ranks share each pod. Ray Train V2 orders
the workers by node, so a pod's ranks are contiguous world ranks, and Ray gives each its local rank; with
the CUDA devices of a node visible to its workers, `ray.train.torch.get_device()` is the rank's own GPU.

Single-node stand-in (tests, `kubetune run`): the local Ray cluster is one node (it binds loopback only and
then refuses a second node), so it cannot host several real pods. When every rank finds itself on one node
although the spec asks for several pods, the pods are emulated: pod p holds world ranks
p*R .. p*R+R-1 (R ranks per pod), the layout KubeRay gives, and each emulated pod has its own node-local
model cache folder and staging folder, as a pod has its own disk. CPU slots stand in for GPUs
(`ranksPerWorker` on a CPU spec).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

from kubetune.api import ResourcesSpec

# Locally the machine may have 2 cores for all ranks and the driver: a fraction of a CPU each leaves room
# for Ray's own tasks (with a whole CPU each, Ray Data's read task starves and the run hangs).
LOCAL_CPU_PER_RANK = 0.5


def ranks_per_worker(res: ResourcesSpec) -> int:
    """Ranks on each worker pod: one per GPU; on CPU `ranksPerWorker` (default 1)."""
    if res.gpus_per_worker > 0:
        return res.gpus_per_worker
    return res.ranks_per_worker or 1


def world_size(res: ResourcesSpec) -> int:
    """All the job's ranks: workers x ranks per worker (the number of data shards too)."""
    return res.workers * ranks_per_worker(res)


def cpu_quantity(q: str) -> float:
    """A Kubernetes CPU quantity ("8", "500m", "1.5") in CPUs."""
    return float(q[:-1]) / 1000 if q.endswith("m") else float(q)


def rank_resources(res: ResourcesSpec, local: bool) -> dict[str, float]:
    """Ray resources of one rank: one GPU (on GPUs) and its share of the pod's whole CPUs.

    A pod advertises its CPU limit rounded down; splitting that evenly between the pod's ranks makes the
    ranks of one pod fit exactly, so PACK cannot put more ranks on a pod than it has GPUs (or CPU slots).
    Ray sets each rank's OMP_NUM_THREADS from its CPU share.
    """
    rpw = ranks_per_worker(res)
    if local:
        cpus = LOCAL_CPU_PER_RANK
    else:
        pod_cpus = max(1, math.floor(cpu_quantity(res.cpu_per_worker)))
        cpus = pod_cpus / rpw  # a fractional share is fine for Ray
    out = {"CPU": cpus}
    if res.gpus_per_worker > 0:
        out["GPU"] = 1.0
    return out


def scaling_kwargs(res: ResourcesSpec, local: bool) -> dict[str, Any]:
    """Keyword arguments of ray.train.ScalingConfig for this job's layout."""
    return {
        "num_workers": world_size(res),
        "use_gpu": res.gpus_per_worker > 0,
        "resources_per_worker": rank_resources(res, local),
        # PACK fills a pod's GPUs before the next pod's: a pod's ranks share NVLink and the node cache.
        "placement_strategy": "PACK",
    }


@dataclass(frozen=True)
class RankPlace:
    """Where one rank runs: its pod, its rank within the pod, and whether the pods are emulated."""

    pod: int
    local_rank: int
    ranks_per_pod: int
    emulated: bool

    def describe(self) -> str:
        kind = "emulated pod" if self.emulated else "pod"
        return f"{kind} {self.pod} local rank {self.local_rank}/{self.ranks_per_pod}"


def place(
    res: ResourcesSpec, *, world_rank: int, world: int, local_rank: int, local_world: int, node_rank: int
) -> RankPlace:
    """This rank's place, from what Ray Train reports (see the module docstring for the emulated case)."""
    rpw = ranks_per_worker(res)
    if res.workers > 1 and local_world == world:  # one Ray node standing in for several pods
        return RankPlace(pod=world_rank // rpw, local_rank=world_rank % rpw, ranks_per_pod=rpw, emulated=True)
    return RankPlace(pod=node_rank, local_rank=local_rank, ranks_per_pod=local_world, emulated=False)
