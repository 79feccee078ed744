"""The inference service: a Deployment running vLLM's OpenAI-compatible server on the exported model, and the
Service in front of it. Pure: a spec, the trainer's `status.model` and settings in, plain dicts out.

Two steps, so that "what to serve" can be judged (and explained in a condition) before anything is built:

1. `serving_plan(owner, spec, model_status)` decides what is served and where it comes from. The trainer
   reports the exported artifact in `status.model` {uri, baseUri, mergedUri, kind}
   (`kubetune_trainer.export`); when that is absent the deterministic layout is used:
   `<output.uri>/<namespace>/<name>/model` (the adapter with LoRA, the whole model with full fine-tuning) and
   `.../merged` (with LoRA and output.exportMerged). Modes:
   - `adapter` (LoRA's default): the base model plus the adapter, `--enable-lora --lora-modules
     <served>=/models/model --max-lora-rank <bucket>`. Clients ask for the *served name* and get the
     fine-tune; the bare base is served beside it as `<served>-base` (vLLM needs a name for it, and a
     comparison with the base is often wanted).
   - `merged`: the merged weights (status.model.mergedUri), a plain model.
   - `full`: a full fine-tune's weights.
   It raises `NotServable(reason, message)` when the artifact cannot be served (no merged weights, a LoRA
   adapter on a GGUF base).
2. `deployment(...)` and `service(...)` build the objects from the plan.

The Deployment, and why:
- Weights are fetched by init containers running `python3 -m kubetune.fetch <s3 uri> /models/<x>` into an
  emptyDir shared with the server (one for the model, one for an s3:// base in adapter mode). S3 endpoint and
  region come from spec.dataset; credentials from the job's Secret through `secretKeyRef`, never inline. An
  `hf://` base is not fetched: vLLM loads it from the hub itself (clusters that reach the hub), with HF_TOKEN
  from `spec.model.tokenSecretRef` by `secretKeyRef` for a gated or private base.
- The server is the command `kubetune.vllm.VLLM_COMMAND` with `kubetune.vllm.vllm_args(...)`, the one
  place the vLLM command line is built, the same as a local run. It listens on `0.0.0.0` (see `SERVER_HOST`).
- GPUs: `spec.deploy.resources.gpus` under `spec.resources.gpuResourceName` (the cluster's GPU resource,
  shared with training); more than one GPU per replica turns on tensor parallelism. The training tolerations
  apply to GPU replicas (GPU nodes are usually tainted); the training nodeSelector does not (it names the
  training GPU class). CPU replicas (gpus 0) get vLLM's CPU environment (`vllm_cpu_env`, KV cache a quarter
  of the memory) and `--enforce-eager` (no compile warm-up); they need a CPU build of the image.
- Requests equal limits (Guaranteed QoS). Probes on vLLM's `/health`: a startup probe allows 30 minutes for
  fetching and loading, then readiness (in the Service or not) and liveness (restart a wedged engine).
  `progressDeadlineSeconds` is 30 minutes for the same reason.
- Rolling updates surge one replica and keep every old one until its replacement is ready (no downtime; a
  change needs room for one more replica).
- Non-root, no privilege escalation, all capabilities dropped; no ServiceAccount token (vLLM does not call
  the API); `enableServiceLinks: false` because a Service named e.g. `vllm` in the namespace would inject
  `VLLM_PORT=tcp://...`, which vLLM reads as its own setting. HOME is an emptyDir (vLLM, torch and Triton
  write caches there) so any image works with a read-only home.
- Labels tie both objects to the job (`kubetune.io/job`, `app.kubernetes.io/component: inference`), owner
  references make the garbage collector remove them with the job, and the annotation `kubetune.io/serving-hash`
  (a hash of the built spec) tells the operator whether the object in the cluster is still what the spec asks.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from typing import Any, Literal

from kubetune import api
from kubetune.vllm import DEFAULT_PORT, HEALTH_PATH, VLLM_COMMAND, lora_rank_bucket, vllm_args, vllm_cpu_env
from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.meta import LABEL_JOB, Owner, labels, object_meta
from kubetune_operator.settings import Settings

COMPONENT = "inference"
ANNOTATION_SERVING_HASH = "kubetune.io/serving-hash"
PORT = DEFAULT_PORT  # the Service's port and the container's (vLLM's default)
PORT_NAME = "http"
# A pod's server must listen on the pod's IP for the Service and the kubelet's probes to reach it; the pod's
# network namespace is its own, so 0.0.0.0 there exposes nothing beyond the pod. (Servers kubetune runs on a
# developer's machine bind 127.0.0.1; this literal is for the container spec only.)
SERVER_HOST = "0.0.0.0"  # noqa: S104 - inside the pod's own network namespace, see above
MODELS_DIR = "/models"
MODEL_DIR = f"{MODELS_DIR}/model"
BASE_DIR = f"{MODELS_DIR}/base"
HOME_DIR = "/home/kubetune"
FETCH_COMMAND = (VLLM_COMMAND[0], "-m", "kubetune.fetch")  # the same interpreter as the server's
MODELS_VOLUME, HOME_VOLUME, SHM_VOLUME = "models", "home", "dshm"
SERVER_CONTAINER = "vllm"
RUN_AS = 1000
STARTUP_SECONDS = 1800
FETCH_RESOURCES = {"requests": {"cpu": "500m", "memory": "512Mi"}, "limits": {"cpu": "2", "memory": "2Gi"}}
BASE_NAME_SUFFIX = "-base"

Mode = Literal["adapter", "merged", "full"]


class NotServable(Exception):
    """The job's artifact cannot be served as the spec asks; `reason` is a Deployed condition reason."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class ServingPlan:
    """What one job serves: resolved from the spec and the trainer's report, before any object is built."""

    mode: Mode
    served_model_name: str
    model_uri: str  # s3:// prefix fetched into MODEL_DIR: the adapter (adapter mode) or the whole model
    base_uri: str | None = None  # adapter mode: the base model (s3:// fetched into BASE_DIR, or hf://)
    base_revision: str | None = None  # hf:// base: the revision to load
    max_lora_rank: int | None = None  # adapter mode: vLLM's --max-lora-rank bucket for the adapter's rank
    chat_template: str | None = None  # file under model_uri with the trainer's chat template (--chat-template)

    @property
    def base_served_name(self) -> str | None:
        return self.served_model_name + BASE_NAME_SUFFIX if self.mode == "adapter" else None


def served_model_name(owner: Owner, spec: api.FineTuneJobSpec) -> str:
    return spec.deploy.served_model_name or owner.name


def max_lora_r(spec: api.FineTuneJobSpec) -> int:
    """The largest adapter rank the job can export: spec.training.lora.r, or the top of a tuned lora.r range."""
    r = spec.training.lora_settings.r
    if spec.tuning is not None:
        p = spec.tuning.search_space.get("lora.r")
        if p is not None:
            candidates = list(p.values or []) + [x for x in (p.low, p.high) if x is not None]
            r = max([r, *(int(v) for v in candidates)])
    return r


def _artifact(model_status: dict[str, Any] | None) -> api.ModelArtifact | None:
    """status.model as the trainer wrote it; keys this operator does not know (a newer trainer) are ignored."""
    if not model_status:
        return None
    known = {f.alias or n for n, f in api.ModelArtifact.model_fields.items()}
    try:
        return api.ModelArtifact.model_validate({k: v for k, v in model_status.items() if k in known})
    except ValueError:
        return None


def serving_plan(owner: Owner, spec: api.FineTuneJobSpec, model_status: dict[str, Any] | None) -> ServingPlan:
    """What to serve for this job; raises NotServable with a condition reason and an actionable message."""
    artifact = _artifact(model_status)
    run = api.run_uri(spec.output.uri, owner.namespace, owner.name, owner.uid or None)
    name = served_model_name(owner, spec)
    if not name or any(ch.isspace() for ch in name) or "=" in name:
        raise NotServable(
            c.SERVING_REJECTED, f"spec.deploy.servedModelName {name!r}: vLLM takes a name without whitespace or '='"
        )
    lora = (artifact.kind == "adapter") if artifact is not None and artifact.kind else (spec.training.method == "lora")
    model_uri = (artifact.uri if artifact is not None and artifact.uri else None) or f"{run}/model"
    template = artifact.chat_template if artifact is not None else None
    if template is not None and not _FILE_NAME.match(template):
        raise NotServable(
            c.SERVING_REJECTED,
            f"status.model.chatTemplate {template!r}: must be a file name under "
            "status.model.uri (letters, digits, '.', '-', '_')",
        )
    if not lora:
        return ServingPlan(mode="full", served_model_name=name, model_uri=model_uri, chat_template=template)
    mode: Mode = spec.deploy.mode or "adapter"
    if mode == "merged":
        merged = (
            artifact.merged_uri if artifact is not None else (f"{run}/merged" if spec.output.export_merged else None)
        )
        if not merged:
            raise NotServable(
                c.MODEL_UNAVAILABLE,
                "spec.deploy.mode is merged but the run exported no merged "
                "weights (status.model.mergedUri is empty; spec.output.exportMerged was false when "
                "it trained); serve the adapter (mode: adapter) or train again with exportMerged",
            )
        return ServingPlan(mode="merged", served_model_name=name, model_uri=merged)
    if spec.model.gguf_file:
        raise NotServable(
            c.UNSUPPORTED_MODEL,
            f"the base model is a GGUF file ({spec.model.gguf_file}), on which "
            "vLLM does not serve LoRA adapters; set spec.deploy.mode: merged (with "
            "spec.output.exportMerged: true) to serve the adapter merged into plain weights",
        )
    base = (artifact.base_uri if artifact is not None and artifact.base_uri else None) or spec.model.uri
    try:
        rank = lora_rank_bucket(max_lora_r(spec))
    except ValueError as e:
        raise NotServable(
            c.UNSUPPORTED_MODEL,
            f"{e}; serve the adapter merged (spec.deploy.mode: merged, with spec.output.exportMerged: true)",
        ) from None
    return ServingPlan(
        mode="adapter",
        served_model_name=name,
        model_uri=model_uri,
        base_uri=base,
        base_revision=spec.model.revision if base.startswith("hf://") else None,
        max_lora_rank=rank,
        chat_template=template,
    )


# --------------------------------------------------------------------------------------------- objects


def selector(owner: Owner) -> dict[str, str]:
    """The pods of this job's inference Deployment (immutable once the Deployment exists: keep it minimal)."""
    return {LABEL_JOB: names.label_value(owner.name), "app.kubernetes.io/component": COMPONENT}


def endpoint(owner: Owner, spec: api.FineTuneJobSpec) -> dict[str, str]:
    """status.endpoint: the OpenAI base URL inside the cluster, and the model name to ask for."""
    url = f"http://{names.inference(owner.name)}.{owner.namespace}.svc:{PORT}/v1"
    return {"url": url, "model": served_model_name(owner, spec)}


def serving_hash(obj: dict[str, Any]) -> str:
    """A short hash of an object's spec as built (stored in ANNOTATION_SERVING_HASH)."""
    canonical = json.dumps(obj["spec"], sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:16]


def _with_hash(obj: dict[str, Any]) -> dict[str, Any]:
    obj["metadata"].setdefault("annotations", {})[ANNOTATION_SERVING_HASH] = serving_hash(obj)
    return obj


def s3_env(secret: str | None) -> list[dict[str, Any]]:
    """The S3 keys from `secret` by reference (secretKeyRef), never inline."""
    env: list[dict[str, Any]] = []
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
    return env


def hub_token_env(spec: api.FineTuneJobSpec) -> list[dict[str, Any]]:
    """HF_TOKEN from spec.model.tokenSecretRef by reference (huggingface_hub and vLLM read it), or nothing."""
    ref = spec.model.token_secret_ref
    if ref is None:
        return []
    return [{"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}]


def _fetch_container(name: str, image: str, spec: api.FineTuneJobSpec, uri: str, dest: str) -> dict[str, Any]:
    ds = spec.dataset
    return fetch_container(name, image, uri, dest, endpoint=ds.endpoint, region=ds.region, secret=ds.credentials_secret)


def fetch_container(
    name: str, image: str, uri: str, dest: str, *, endpoint: str | None, region: str, secret: str | None
) -> dict[str, Any]:
    """An init container copying the s3:// prefix `uri` into `dest` on the models volume."""
    command = [*FETCH_COMMAND, uri, dest]
    if endpoint:
        command += ["--endpoint-url", endpoint]
    command += ["--region", region]
    return {
        "name": name,
        "image": image,
        "command": command,
        "env": [{"name": "HOME", "value": HOME_DIR}, *s3_env(secret)],
        "resources": json.loads(json.dumps(FETCH_RESOURCES)),
        "volumeMounts": [
            {"name": MODELS_VOLUME, "mountPath": MODELS_DIR},
            {"name": HOME_VOLUME, "mountPath": HOME_DIR},
        ],
        "securityContext": container_security(read_only_root=True),
    }


def container_security(*, read_only_root: bool) -> dict[str, Any]:
    sc: dict[str, Any] = {"allowPrivilegeEscalation": False, "capabilities": {"drop": ["ALL"]}}
    if read_only_root:
        sc["readOnlyRootFilesystem"] = True
    return sc


_FILE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9_.\-]{0,200}$")
_QUANTITY = re.compile(r"^([0-9.]+(?:[eE][-+]?[0-9]+)?)([KMGTP]i?|[kmMGTP]|)$")
_UNITS = {
    "": 1,
    "k": 1e3,
    "K": 1e3,
    "M": 1e6,
    "G": 1e9,
    "T": 1e12,
    "P": 1e15,
    "m": 1e-3,
    "Ki": 2**10,
    "Mi": 2**20,
    "Gi": 2**30,
    "Ti": 2**40,
    "Pi": 2**50,
}


def kv_cache_gib(memory: str) -> int:
    """vLLM's CPU KV cache for a replica: a quarter of its memory limit, at least 1 GiB."""
    m = _QUANTITY.match(memory.strip())
    if not m:
        return 1
    gib = float(m.group(1)) * _UNITS.get(m.group(2), 1) / 2**30
    return max(1, int(gib // 4))


def _server_env(spec: api.FineTuneJobSpec, plan: ServingPlan) -> list[dict[str, Any]]:
    res = spec.deploy.resources
    hub = plan.base_uri is not None and plan.base_uri.startswith("hf://")
    env: dict[str, str] = {"HOME": HOME_DIR}
    if res.gpus == 0:
        env.update(vllm_cpu_env(kv_cache_gib(res.memory)))
    else:
        env.update(
            {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        )
    if hub:  # the base comes from the hub: vLLM must be allowed to reach it
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    return out + (hub_token_env(spec) if hub else [])  # a gated or private base: its token, by reference


def server_args(spec: api.FineTuneJobSpec, plan: ServingPlan) -> list[str]:
    """The vLLM server's arguments for this plan (through kubetune.vllm.vllm_args)."""
    gpus = spec.deploy.resources.gpus
    dtype = None if spec.model.dtype == "auto" else spec.model.dtype  # as the model was trained on
    extra: list[str] = []
    if gpus > 1:
        extra += ["--tensor-parallel-size", str(gpus)]
    # The template the trainer rendered conversations with, fetched with the model.
    template = f"{MODEL_DIR}/{plan.chat_template}" if plan.chat_template else None
    if plan.mode == "adapter":
        assert plan.base_uri is not None
        hub = plan.base_uri.startswith("hf://")
        base_path = plan.base_uri.removeprefix("hf://") if hub else BASE_DIR
        if plan.base_revision:
            extra += ["--revision", plan.base_revision]
        return vllm_args(
            base_path,
            plan.base_served_name,
            PORT,
            SERVER_HOST,
            lora_modules={plan.served_model_name: MODEL_DIR},
            max_lora_rank=plan.max_lora_rank,
            max_model_len=spec.deploy.max_model_len,
            dtype=dtype,
            extra=extra,
            enforce_eager=gpus == 0,
            chat_template=template,
        )
    return vllm_args(
        MODEL_DIR,
        plan.served_model_name,
        PORT,
        SERVER_HOST,
        max_model_len=spec.deploy.max_model_len,
        dtype=dtype,
        extra=extra,
        enforce_eager=gpus == 0,
        chat_template=template,
    )


def probe(period: int, failures: int, timeout: int) -> dict[str, Any]:
    return {
        "httpGet": {"path": HEALTH_PATH, "port": PORT_NAME},
        "periodSeconds": period,
        "failureThreshold": failures,
        "timeoutSeconds": timeout,
    }


def deployment(owner: Owner, spec: api.FineTuneJobSpec, settings: Settings, plan: ServingPlan) -> dict[str, Any]:
    """The vLLM Deployment for `plan`."""
    res = spec.deploy.resources
    image = spec.resources.images.inference or settings.inference_image
    amounts = {"cpu": res.cpu, "memory": res.memory}
    if res.gpus > 0:
        amounts[spec.resources.gpu_resource_name] = str(res.gpus)
    init = [_fetch_container("fetch-model", image, spec, plan.model_uri, MODEL_DIR)]
    if plan.base_uri is not None and plan.base_uri.startswith("s3://"):
        init.insert(0, _fetch_container("fetch-base", image, spec, plan.base_uri, BASE_DIR))
    server = {
        "name": SERVER_CONTAINER,
        "image": image,
        "command": list(VLLM_COMMAND),
        "args": server_args(spec, plan),
        "env": _server_env(spec, plan),
        "ports": [{"name": PORT_NAME, "containerPort": PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "startupProbe": probe(10, STARTUP_SECONDS // 10, 5),
        "readinessProbe": probe(5, 3, 5),
        "livenessProbe": probe(15, 4, 10),
        "volumeMounts": [
            {"name": MODELS_VOLUME, "mountPath": MODELS_DIR, "readOnly": True},
            {"name": HOME_VOLUME, "mountPath": HOME_DIR},
            {"name": SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
        "securityContext": container_security(read_only_root=False),
    }
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS,
            "runAsGroup": RUN_AS,
            "fsGroup": RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": init,
        "containers": [server],
        "volumes": [
            {"name": MODELS_VOLUME, "emptyDir": {}},
            {"name": HOME_VOLUME, "emptyDir": {}},
            # NCCL (tensor parallelism) and vLLM's worker processes share memory through /dev/shm.
            {"name": SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        ],
    }
    if res.gpus > 0 and spec.resources.tolerations:
        pod["tolerations"] = [dict(t) for t in spec.resources.tolerations]
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": object_meta(owner, names.inference(owner.name), COMPONENT),
        "spec": {
            "replicas": spec.deploy.replicas,
            "selector": {"matchLabels": selector(owner)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": STARTUP_SECONDS,
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": labels(owner, COMPONENT)}, "spec": pod},
        },
    }
    return _with_hash(obj)


def service(owner: Owner) -> dict[str, Any]:
    """The ClusterIP Service in front of the Deployment: port 8000 -> the server's `http` port."""
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": object_meta(owner, names.inference(owner.name), COMPONENT),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(owner),
            "ports": [{"name": PORT_NAME, "port": PORT, "targetPort": PORT_NAME, "protocol": "TCP"}],
        },
    }
    return _with_hash(obj)


def serving_children(
    owner: Owner, spec: api.FineTuneJobSpec, settings: Settings, plan: ServingPlan
) -> list[dict[str, Any]]:
    """Service first (the endpoint exists as soon as anything does), then the Deployment."""
    return [service(owner), deployment(owner, spec, settings, plan)]


__all__ = [
    "ANNOTATION_SERVING_HASH",
    "COMPONENT",
    "NotServable",
    "PORT",
    "ServingPlan",
    "deployment",
    "endpoint",
    "selector",
    "server_args",
    "served_model_name",
    "service",
    "serving_children",
    "serving_hash",
    "serving_plan",
]
