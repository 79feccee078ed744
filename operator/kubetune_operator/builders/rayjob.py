"""The KubeRay RayJob (ray.io/v1) that runs the trainer on a RayCluster of its own.

Shape, and why:
- `entrypoint` runs the trainer with the mounted config (under `kubetune.runlog`, which keeps its log in S3); KubeRay submits it to the head (K8sJobMode), so the
  driver runs on the head and Ray Train's workers on the worker group.
- One head group and one worker group. The head gets `num-cpus: "0"` so no training task lands on the
  coordinator; the worker group is fixed-size (replicas = min = max) because a data-parallel run needs all
  its workers at once, and GPUs are requested and limited under `resources.gpuResourceName` with `num-gpus`
  set explicitly (Ray only autodetects nvidia.com/gpu). Each GPU is one training rank (kubetune_trainer.layout).
- Size: `workers` pods for a training run; with tuning, `workers x min(maxConcurrentTrials, trials)` pods, so
  that the concurrent trials (each a Ray Train run of `workers` pods) really run side by side.
- Scratch: the model cache, staging and spill files (KUBETUNE_MODEL_CACHE, KUBETUNE_STAGING_DIR, TMPDIR) go
  to a volume at SCRATCH_DIR, not the container's writable layer: an emptyDir with `sizeLimit`
  (`resources.scratch.size`) or, with `storageClassName`, a generic ephemeral volume (a per-pod claim, e.g.
  local NVMe). The emptyDir's size is also requested as `ephemeral-storage`, so the scheduler picks a node
  with that much disk and the kubelet evicts a pod that overfills it instead of filling the node.
- Multi-node NCCL: /dev/shm is a memory-backed emptyDir (NCCL's intra-node transport and Ray's object store
  use it; the container default is 64 MiB). Pod-to-pod TCP (NCCL's socket transport) needs nothing more;
  InfiniBand/RoCE needs the cluster's RDMA device resources and the IPC_LOCK capability (docs/scaling.md).
- CPU and memory requests equal limits (Guaranteed QoS: a training pod should not be the first evicted).
- `shutdownAfterJobFinishes` + `ttlSecondsAfterFinished` free the GPUs once the run ends; the RayJob itself
  (and its status) stays until the FineTuneJob is deleted.
- `suspend`, `activeDeadlineSeconds`, `backoffLimit` pass through (KubeRay enforces them); the Kueue queue
  name passes through as the `kueue.x-k8s.io/queue-name` label, which is where Kueue reads it.
- `suspend` is shared with Kueue, which suspends and unsuspends the RayJob itself. The value the operator
  last applied is kept in the annotation `kubetune.io/applied-suspend`, and `live_patch` passes on only a
  change of the user's `spec.suspend` against it: a full reconcile, an operator restart or a label edit
  never undoes what Kueue set.
- S3 credentials come from the named Secret through `secretKeyRef`; no key ever appears in this object. So
  do an hf:// base model's access token (`spec.model.tokenSecretRef` -> HF_TOKEN) and the MLflow tracking
  server's credentials (`spec.tracking.mlflow.credentialsSecret` -> MLFLOW_TRACKING_*).
- Every pod runs as the job's trainer ServiceAccount, which may patch only this job's status.
- The head is locked twice: Ray's token authentication through KubeRay's `rayClusterSpec.authOptions`
  (`mode: token`; KubeRay makes the token Secret and hands it to the head, workers and submitter), and a
  NetworkPolicy (builders.network). Pods run non-root as Ray's image user (uid 1000, gid 100: the trainer
  image is built on rayproject/ray and runs as `ray`), with no privilege escalation, every capability dropped
  and the RuntimeDefault seccomp profile. (InfiniBand's IPC_LOCK needs a derived pod template: docs/scaling.md.)
"""

from __future__ import annotations

import copy
from typing import Any

from kubetune import api
from kubetune_operator import names
from kubetune_operator.builders.config import CONFIG_DIR, CONFIG_PATH
from kubetune_operator.builders.inference import hub_token_env
from kubetune_operator.meta import ANNOTATION_SPEC_HASH, LABEL_KUEUE_QUEUE, Owner, labels, object_meta
from kubetune_operator.settings import Settings

# kubetune.runlog passes the trainer's output through and keeps it in S3 (<run>/history/) when it ends, so
# `kubetune logs` still shows it once the RayCluster is gone (docs/serving.md, "History").
ENTRYPOINT = f"python -m kubetune.runlog --config {CONFIG_PATH} -- python -m kubetune_trainer --config {CONFIG_PATH}"
ANNOTATION_APPLIED_SUSPEND = "kubetune.io/applied-suspend"
RAY_UID, RAY_GID = 1000, 100  # the `ray` user of rayproject/ray images, which the trainer image keeps
POD_SECURITY = {
    "runAsNonRoot": True,
    "runAsUser": RAY_UID,
    "runAsGroup": RAY_GID,
    "fsGroup": RAY_GID,
    "seccompProfile": {"type": "RuntimeDefault"},
}
CONTAINER_SECURITY = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
WORKER_GROUP = "workers"
CONFIG_VOLUME = "kubetune-config"
SHM_VOLUME = "dshm"
SCRATCH_VOLUME = "scratch"
SCRATCH_DIR = "/var/lib/kubetune"
HEAD_PORTS = [
    {"name": "gcs-server", "containerPort": 6379},
    {"name": "dashboard", "containerPort": 8265},
    {"name": "client", "containerPort": 10001},
]


def _env(owner: Owner, spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "KUBETUNE_JOB_NAME", "value": owner.name},
        {"name": "KUBETUNE_JOB_NAMESPACE", "value": owner.namespace},
        {"name": "KUBETUNE_CONFIG", "value": CONFIG_PATH},
        {"name": "RAY_USAGE_STATS_ENABLED", "value": "0"},
        {"name": "KUBETUNE_MODEL_CACHE", "value": f"{SCRATCH_DIR}/models"},
        {"name": "KUBETUNE_STAGING_DIR", "value": f"{SCRATCH_DIR}/staging"},
        {"name": "TMPDIR", "value": f"{SCRATCH_DIR}/tmp"},
    ]
    secret = spec.dataset.credentials_secret
    if secret:
        for key, optional in (
            ("AWS_ACCESS_KEY_ID", False),
            ("AWS_SECRET_ACCESS_KEY", False),
            ("AWS_SESSION_TOKEN", True),
        ):
            ref: dict[str, Any] = {"name": secret, "key": key}
            if optional:
                ref["optional"] = True
            env.append({"name": key, "valueFrom": {"secretKeyRef": ref}})
    env.extend(hub_token_env(spec))
    env.extend(tracking_env(spec))
    return env


# The MLflow client's own variables; which of them a Secret holds depends on the server's authentication.
MLFLOW_SECRET_KEYS = ("MLFLOW_TRACKING_TOKEN", "MLFLOW_TRACKING_USERNAME", "MLFLOW_TRACKING_PASSWORD")


def tracking_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """The MLflow credentials from spec.tracking.mlflow.credentialsSecret by reference (each key optional)."""
    secret = spec.tracking.mlflow.credentials_secret if spec.tracking else None
    if not secret:
        return []
    return [
        {"name": key, "valueFrom": {"secretKeyRef": {"name": secret, "key": key, "optional": True}}}
        for key in MLFLOW_SECRET_KEYS
    ]


def _volumes(owner: Owner, scratch: api.ScratchSpec) -> list[dict[str, Any]]:
    return [
        {"name": CONFIG_VOLUME, "configMap": {"name": names.config_map(owner.name)}},
        # Ray's object store and NCCL's shared-memory transport live in /dev/shm; the container default
        # (64 MiB) is far too small.
        {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        _scratch_volume(scratch),
    ]


def _scratch_volume(scratch: api.ScratchSpec) -> dict[str, Any]:
    if scratch.storage_class_name:
        claim = {
            "accessModes": ["ReadWriteOnce"],
            "storageClassName": scratch.storage_class_name,
            "resources": {"requests": {"storage": scratch.size}},
        }
        return {"name": SCRATCH_VOLUME, "ephemeral": {"volumeClaimTemplate": {"spec": claim}}}
    return {"name": SCRATCH_VOLUME, "emptyDir": {"sizeLimit": scratch.size}}


def _mounts() -> list[dict[str, Any]]:
    return [
        {"name": CONFIG_VOLUME, "mountPath": CONFIG_DIR, "readOnly": True},
        {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        {"name": SCRATCH_VOLUME, "mountPath": SCRATCH_DIR},
    ]


def _pod_template(
    owner: Owner,
    spec: api.FineTuneJobSpec,
    image: str,
    container: str,
    resources: dict[str, Any],
    ports: list[dict[str, Any]] | None = None,
    node_selector: dict[str, str] | None = None,
) -> dict[str, Any]:
    c: dict[str, Any] = {
        "name": container,
        "image": image,
        "env": _env(owner, spec),
        "resources": resources,
        "volumeMounts": _mounts(),
        "securityContext": copy.deepcopy(CONTAINER_SECURITY),
    }
    if ports:
        c["ports"] = ports
    pod: dict[str, Any] = {
        "serviceAccountName": names.service_account(owner.name),
        "securityContext": copy.deepcopy(POD_SECURITY),
        "containers": [c],
        "volumes": _volumes(owner, spec.resources.scratch),
    }
    if node_selector:
        pod["nodeSelector"] = dict(node_selector)
    if spec.resources.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.resources.tolerations]
    return {"metadata": {"labels": labels(owner, "training")}, "spec": pod}


def _guaranteed(
    cpu: str, memory: str, extra: dict[str, str] | None = None, scratch: api.ScratchSpec | None = None
) -> dict[str, Any]:
    amounts = {"cpu": cpu, "memory": memory, **(extra or {})}
    out = {"requests": dict(amounts), "limits": dict(amounts)}
    if scratch is not None and not scratch.storage_class_name:
        # Requested, not limited: the emptyDir's sizeLimit bounds the scratch; the writable layer stays free.
        out["requests"]["ephemeral-storage"] = scratch.size
    return out


def worker_replicas(spec: api.FineTuneJobSpec) -> int:
    """Worker pods: one run's `workers`, times the trials that run at once when tuning."""
    concurrent = min(spec.tuning.max_concurrent_trials, spec.tuning.trials) if spec.tuning else 1
    return spec.resources.workers * concurrent


def ray_job(owner: Owner, spec: api.FineTuneJobSpec, settings: Settings, spec_hash: str) -> dict[str, Any]:
    res = spec.resources
    image = res.images.trainer or settings.trainer_image
    extra_labels = {LABEL_KUEUE_QUEUE: res.queue} if res.queue else {}
    metadata = object_meta(owner, names.ray_job(owner.name), "training", **extra_labels)
    metadata["annotations"] = {ANNOTATION_SPEC_HASH: spec_hash, ANNOTATION_APPLIED_SUSPEND: _flag(spec.suspend)}

    gpus = {res.gpu_resource_name: str(res.gpus_per_worker)} if res.gpus_per_worker > 0 else None
    worker_start = {"num-gpus": str(res.gpus_per_worker)} if res.gpus_per_worker > 0 else {}
    head = {
        "rayStartParams": {"num-cpus": "0"},
        "template": _pod_template(
            owner,
            spec,
            image,
            "ray-head",
            _guaranteed(res.head.cpu, res.head.memory, scratch=res.scratch),
            ports=HEAD_PORTS,
        ),
    }
    worker = {
        "groupName": WORKER_GROUP,
        "replicas": worker_replicas(spec),
        "minReplicas": worker_replicas(spec),
        "maxReplicas": worker_replicas(spec),
        "rayStartParams": worker_start,
        "template": _pod_template(
            owner,
            spec,
            image,
            "ray-worker",
            _guaranteed(res.cpu_per_worker, res.memory_per_worker, gpus, res.scratch),
            node_selector=res.node_selector,
        ),
    }
    job_spec: dict[str, Any] = {
        "entrypoint": ENTRYPOINT,
        "submissionMode": "K8sJobMode",
        "shutdownAfterJobFinishes": True,
        "ttlSecondsAfterFinished": settings.ray_ttl_seconds,
        "backoffLimit": spec.backoff_limit,
        "suspend": spec.suspend,
        "rayClusterSpec": {
            "rayVersion": settings.ray_version,
            "authOptions": {"mode": "token"},
            "headGroupSpec": head,
            "workerGroupSpecs": [worker],
        },
    }
    if spec.active_deadline_seconds is not None:
        job_spec["activeDeadlineSeconds"] = spec.active_deadline_seconds
    return {"apiVersion": "ray.io/v1", "kind": "RayJob", "metadata": metadata, "spec": job_spec}


def _flag(value: bool) -> str:
    return "true" if value else "false"


def live_fields(spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """The RayJob spec fields that follow the FineTuneJob after creation (see kubetune_operator.policy)."""
    return {
        "suspend": spec.suspend,
        "activeDeadlineSeconds": spec.active_deadline_seconds,
        "backoffLimit": spec.backoff_limit,
    }


def live_patch(ray: dict[str, Any], spec: api.FineTuneJobSpec) -> dict[str, Any]:
    """The merge patch that brings an existing RayJob's live fields in line with `spec` ({} when none).

    `suspend` only when the user changed `spec.suspend` since the operator last applied it (the annotation);
    otherwise the RayJob's suspend is Kueue's (or KubeRay's) and stays as it is. A RayJob without the
    annotation (made by an older operator) gets it recorded, its suspend untouched."""
    current = ray.get("spec") or {}
    wanted = live_fields(spec)
    spec_patch = {k: v for k, v in wanted.items() if k != "suspend" and current.get(k) != v}
    applied = ((ray.get("metadata") or {}).get("annotations") or {}).get(ANNOTATION_APPLIED_SUSPEND)
    patch: dict[str, Any] = {}
    if applied != _flag(spec.suspend):
        if applied is not None and current.get("suspend", False) != spec.suspend:
            spec_patch["suspend"] = spec.suspend
        patch["metadata"] = {"annotations": {ANNOTATION_APPLIED_SUSPEND: _flag(spec.suspend)}}
    if spec_patch:
        patch["spec"] = spec_patch
    return patch
