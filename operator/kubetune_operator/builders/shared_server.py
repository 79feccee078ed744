"""Shared multi-LoRA inference servers: one vLLM Deployment on a base model serving the adapters of every job
whose `spec.deploy.server` names it. Pure: declarations and registrations in, plain dicts out.

Three kinds of object, all tied together by the label `kubetune.io/inference-server: <server>`:

- The declaration, written by whoever runs the server: a ConfigMap named `<server>` with that label and a key
  `server.yaml` holding an `api.InferenceServerSpec` (base model, replicas, resources, max LoRA rank...). A
  labelled ConfigMap rather than a CRD of its own: nothing new to install or version, any namespace admin can
  write one, and the operator validates it (a bad one is reported in every using job's `Deployed` condition,
  naming the key).
- One registration per job (`registration`): a ConfigMap `<job>-adapter` owned by the job (so the garbage
  collector removes it with the job) with the label and `adapter.json` {job, model, uri, baseUri, rank, S3
  endpoint/region/Secret name}. The operator writes it when the job's adapter is to be served.
- The server itself (`deployment`, `service`), both named `<server>` and owned by the declaration (deleting
  the declaration removes the server). Every registered adapter is in the pod template: an init container
  fetches each (with its own job's Secret, by reference) and `--lora-modules` names each. So every replica
  and every restarted pod serves all of them, and nothing depends on state loaded into one process at run
  time (vLLM's runtime LoRA API would lose adapters on a restart and reach only the replica a request lands
  on). The price: adding or removing an adapter rolls the Deployment (one surge replica at a time, no
  downtime; `maxUnavailable: 0`).

Adapters that cannot be served on this server are left out (`usable_adapters`): another base, a rank above
the server's `maxLoraRank`, a chat template other than the server's, or a model name already taken by an
older registration.

Chat templates: vLLM renders every adapter's chat prompts with the server's one template (`chatTemplate` of
the declaration, else the base's own). An adapter trained on conversations rendered with another template
would be served prompts laid out as it never saw them, so it is refused (`ChatTemplateMismatch`). The
registration carries a digest of the template the job trained with (`spec.dataset.chatTemplate` resolved;
none: the base's own), and whether its data was conversational at all (completion text uses no template).
Two unset templates match; a set one and an unset one do not: the operator cannot read the base's template,
so it does not guess that they agree.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from typing import Any

import yaml

from kubetune import api, chat_templates
from kubetune.vllm import VLLM_COMMAND, VLLM_LORA_RANKS, vllm_args, vllm_cpu_env
from kubetune_operator import conditions as c
from kubetune_operator import names
from kubetune_operator.builders import inference as inf
from kubetune_operator.meta import MANAGED_BY, Owner, object_meta
from kubetune_operator.settings import Settings

LABEL_SERVER = "kubetune.io/inference-server"
DECLARATION_KEY = "server.yaml"
REGISTRATION_KEY = "adapter.json"
COMPONENT = "inference-server"
ADAPTER_COMPONENT = "adapter"
ADAPTERS_DIR = f"{inf.MODELS_DIR}/adapters"
# Formats the trainer renders with a chat template (kubetune_trainer.data.encode); completion and classification
# text is tokenised as it is.
CONVERSATIONAL_FORMATS = frozenset({"chat", "instruction", "preference"})


class InvalidDeclaration(ValueError):
    """The declaration ConfigMap cannot be used; the message names the key and field."""


@dataclass(frozen=True)
class Adapter:
    """One job's adapter as registered for a server."""

    job: str
    model: str  # the OpenAI model name clients ask for
    uri: str
    base_uri: str
    rank: int
    base_revision: str | None = None  # hf:// base: the revision it trained on (spec.model.revision)
    endpoint: str | None = None
    region: str = "us-east-1"
    secret: str | None = None
    created: str = ""  # the registration's creationTimestamp: the older of two same-named adapters wins
    chat_template: str | None = None  # template_digest of the template it trained with; None: the base's own
    uses_chat_template: bool = True  # its training data was rendered with a chat template (chat, instruction...)

    def wire(self) -> dict[str, Any]:
        return {
            "job": self.job,
            "model": self.model,
            "uri": self.uri,
            "baseUri": self.base_uri,
            "baseRevision": self.base_revision,
            "rank": self.rank,
            "endpoint": self.endpoint,
            "region": self.region,
            "credentialsSecret": self.secret,
            "chatTemplate": self.chat_template,
            "usesChatTemplate": self.uses_chat_template,
        }


# ------------------------------------------------------------------------------------------ templates


def template_digest(value: str | None) -> str | None:
    """sha256 of the Jinja a chatTemplate value (name or inline) resolves to; None for unset (the base's own).
    One trailing newline is dropped first: Jinja drops it when rendering, and YAML block scalars add one."""
    if value is None:
        return None
    text = chat_templates.resolve(value)
    return "sha256:" + hashlib.sha256(text.removesuffix("\n").encode("utf-8")).hexdigest()


def job_template(spec: api.FineTuneJobSpec) -> tuple[bool, str | None]:
    """(whether the job's training rendered chat templates, the digest of the template it used)."""
    uses = any(src.format in CONVERSATIONAL_FORMATS for src in spec.dataset.train_sources())
    return uses, template_digest(spec.dataset.chat_template)


def _template_words(digest: str | None) -> str:
    if digest is None:
        return "the base model's own template"
    named = next((n for n in chat_templates.NAMED if template_digest(n) == digest), None)
    return f"the named template {named}" if named else f"an inline template ({digest[:19]})"


# ------------------------------------------------------------------------------------------ reading


def declaration_spec(cm: dict[str, Any]) -> api.InferenceServerSpec:
    """The server's spec from its declaration ConfigMap; raises InvalidDeclaration naming the field."""
    name = cm["metadata"]["name"]
    text = (cm.get("data") or {}).get(DECLARATION_KEY)
    if text is None:
        raise InvalidDeclaration(f"ConfigMap {name} has no key {DECLARATION_KEY}")
    try:
        raw = yaml.safe_load(text)
    except yaml.YAMLError as e:
        raise InvalidDeclaration(f"ConfigMap {name} {DECLARATION_KEY}: not YAML ({e})") from None
    try:
        spec = api.InferenceServerSpec.model_validate(raw if raw is not None else {})
    except ValueError as e:
        errors: list[dict[str, Any]] = list(getattr(e, "errors", lambda: [])())
        detail = "; ".join(_error_text(err) for err in errors)
        raise InvalidDeclaration(f"ConfigMap {name} {DECLARATION_KEY}: {detail or e}") from None
    if spec.max_lora_rank not in VLLM_LORA_RANKS:
        raise InvalidDeclaration(
            f"ConfigMap {name} {DECLARATION_KEY}: maxLoraRank: must be one of {', '.join(map(str, VLLM_LORA_RANKS))}"
        )
    return spec


def _error_text(err: dict[str, Any]) -> str:
    path = ".".join(str(p) for p in err["loc"])
    if path:
        return f"{path}: {err['msg']}"
    return str(err["msg"]).removeprefix("Value error, ")  # a cross-field rule: its message names the field


def adapter_of(cm: dict[str, Any]) -> Adapter | None:
    """The adapter a registration ConfigMap holds (None when it is not one, or is being deleted)."""
    meta = cm.get("metadata") or {}
    if meta.get("deletionTimestamp"):
        return None
    try:
        d = json.loads((cm.get("data") or {})[REGISTRATION_KEY])
        return Adapter(
            job=d["job"],
            model=d["model"],
            uri=d["uri"],
            base_uri=d["baseUri"],
            base_revision=d.get("baseRevision"),
            rank=int(d["rank"]),
            endpoint=d.get("endpoint"),
            region=d.get("region") or "us-east-1",
            secret=d.get("credentialsSecret"),
            created=meta.get("creationTimestamp") or "",
            chat_template=d.get("chatTemplate"),
            uses_chat_template=bool(d.get("usesChatTemplate", True)),
        )
    except (KeyError, ValueError, TypeError):
        return None


def template_mismatch(server: str, spec: api.InferenceServerSpec, adapter: Adapter) -> str | None:
    """Why the server's chat template is not the one the adapter trained with (None: it is, or none applies)."""
    served = template_digest(spec.chat_template)
    if not adapter.uses_chat_template or adapter.chat_template == served:
        return None
    return (
        f"the adapter was trained on prompts rendered with {_template_words(adapter.chat_template)} "
        f"(spec.dataset.chatTemplate), but inference server {server} renders every prompt with "
        f"{_template_words(served)} (chatTemplate of its server.yaml); serve it on a server with the same "
        "template, or on a dedicated one (unset spec.deploy.server)"
    )


def refusal(
    server: str, spec: api.InferenceServerSpec, adapter: Adapter, others: list[Adapter]
) -> tuple[str, str] | None:
    """Why `adapter` is not served on `server`: (reason, message) of the job's Deployed condition; None: it is."""
    if adapter.base_uri.rstrip("/") != spec.base_model.rstrip("/"):
        return c.SERVER_REFUSED, (
            f"inference server {server} serves base {spec.base_model}, the adapter was trained on "
            f"{adapter.base_uri} (spec.deploy.server)"
        )
    served, trained = spec.revision or "main", adapter.base_revision or "main"  # the hub's default: main
    if spec.base_model.startswith("hf://") and served != trained:
        # LoRA deltas are trained against one set of base weights; another revision is another base.
        return c.SERVER_REFUSED, (
            f"inference server {server} serves {spec.base_model} at revision {served}, the adapter was "
            f"trained on revision {trained} (spec.model.revision)"
        )
    if adapter.rank > spec.max_lora_rank:
        return c.SERVER_REFUSED, (
            f"the adapter's LoRA rank {adapter.rank} exceeds inference server {server}'s maxLoraRank "
            f"{spec.max_lora_rank} (spec.deploy.server)"
        )
    mismatch = template_mismatch(server, spec, adapter)
    if mismatch is not None:
        return c.CHAT_TEMPLATE_MISMATCH, mismatch
    holder = next(
        (
            o
            for o in others
            if o.model == adapter.model and o.job != adapter.job and (o.created, o.job) < (adapter.created, adapter.job)
        ),
        None,
    )
    if holder is not None:
        return c.SERVER_REFUSED, (
            f"model name {adapter.model} is already served on inference server {server} by job {holder.job} "
            "(spec.deploy.servedModelName)"
        )
    return None


def usable_adapters(server: str, spec: api.InferenceServerSpec, adapters: list[Adapter]) -> list[Adapter]:
    """The adapters the server serves, in a stable order (by job name)."""
    return sorted((a for a in adapters if refusal(server, spec, a, adapters) is None), key=lambda a: a.job)


# ------------------------------------------------------------------------------------------ objects


def registration_name(job: str) -> str:
    return names.child_name(job, "adapter")


def registration(owner: Owner, server: str, adapter: Adapter) -> dict[str, Any]:
    """The ConfigMap that puts `owner`'s adapter on `server` (owned by the job: it goes with the job)."""
    meta = object_meta(owner, registration_name(owner.name), ADAPTER_COMPONENT, **{LABEL_SERVER: server})
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": meta,
        "data": {REGISTRATION_KEY: json.dumps(adapter.wire(), sort_keys=True)},
    }


def server_labels(server: str) -> dict[str, str]:
    return {
        "app.kubernetes.io/name": "kubetune",
        "app.kubernetes.io/instance": server,
        "app.kubernetes.io/component": COMPONENT,
        "app.kubernetes.io/part-of": "kubetune",
        "app.kubernetes.io/managed-by": MANAGED_BY,
        LABEL_SERVER: server,
    }


def selector(server: str) -> dict[str, str]:
    return {LABEL_SERVER: server, "app.kubernetes.io/component": COMPONENT}


def _meta(declaration: dict[str, Any]) -> dict[str, Any]:
    m = declaration["metadata"]
    return {
        "name": m["name"],
        "namespace": m["namespace"],
        "labels": server_labels(m["name"]),
        "ownerReferences": [
            {
                "apiVersion": "v1",
                "kind": "ConfigMap",
                "name": m["name"],
                "uid": m["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def endpoint(server: str, namespace: str, model: str) -> dict[str, str]:
    return {"url": f"http://{server}.{namespace}.svc:{inf.PORT}/v1", "model": model}


def adapter_dir(adapter: Adapter) -> str:
    return f"{ADAPTERS_DIR}/{adapter.job}"


def server_args(server: str, spec: api.InferenceServerSpec, adapters: list[Adapter]) -> list[str]:
    """vLLM's arguments: the base served as `<server>-base`, each adapter under its model name."""
    gpus = spec.resources.gpus
    hub = spec.base_model.startswith("hf://")
    extra = ["--tensor-parallel-size", str(gpus)] if gpus > 1 else []
    if spec.revision and hub:
        extra += ["--revision", spec.revision]
    return vllm_args(
        spec.base_model.removeprefix("hf://") if hub else inf.BASE_DIR,
        server + inf.BASE_NAME_SUFFIX,
        inf.PORT,
        inf.SERVER_HOST,
        lora_modules={a.model: adapter_dir(a) for a in adapters},
        max_lora_rank=spec.max_lora_rank,
        max_model_len=spec.max_model_len,
        dtype=None if spec.dtype == "auto" else spec.dtype,
        extra=extra,
        enforce_eager=gpus == 0,
        chat_template=chat_templates.resolve(spec.chat_template) if spec.chat_template else None,
        max_loras=spec.max_loras,
    )


def _init_containers(image: str, spec: api.InferenceServerSpec, adapters: list[Adapter]) -> list[dict[str, Any]]:
    init = []
    if spec.base_model.startswith("s3://"):
        init.append(
            inf.fetch_container(
                "fetch-base",
                image,
                spec.base_model,
                inf.BASE_DIR,
                endpoint=spec.endpoint,
                region=spec.region,
                secret=spec.credentials_secret,
            )
        )
    for a in adapters:  # each with its own job's S3 settings and Secret
        init.append(
            inf.fetch_container(
                names.trimmed(f"fetch-{a.job}"),
                image,
                a.uri,
                adapter_dir(a),
                endpoint=a.endpoint,
                region=a.region,
                secret=a.secret,
            )
        )
    return init


def _env(spec: api.InferenceServerSpec) -> list[dict[str, Any]]:
    env = {"HOME": inf.HOME_DIR}
    if spec.resources.gpus == 0:
        env.update(vllm_cpu_env(inf.kv_cache_gib(spec.resources.memory)))
    else:
        env.update(
            {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "VLLM_NO_USAGE_STATS": "1", "DO_NOT_TRACK": "1"}
        )
    hub = spec.base_model.startswith("hf://")
    if hub:
        env.pop("HF_HUB_OFFLINE", None)
        env.pop("TRANSFORMERS_OFFLINE", None)
    out: list[dict[str, Any]] = [{"name": k, "value": v} for k, v in env.items()]
    ref = spec.token_secret_ref
    if hub and ref is not None:  # a gated or private base: vLLM downloads it with this token, by reference
        out.append({"name": "HF_TOKEN", "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}})
    return out


def deployment(
    declaration: dict[str, Any],
    spec: api.InferenceServerSpec,
    adapters: list[Adapter],
    settings: Settings,
    gpu_resource_name: str = "nvidia.com/gpu",
) -> dict[str, Any]:
    """The server's Deployment: the base plus every adapter in `adapters` (see the module docstring)."""
    server = declaration["metadata"]["name"]
    image = spec.image or settings.inference_image
    amounts = {"cpu": spec.resources.cpu, "memory": spec.resources.memory}
    if spec.resources.gpus > 0:
        amounts[gpu_resource_name] = str(spec.resources.gpus)
    container = {
        "name": inf.SERVER_CONTAINER,
        "image": image,
        "command": list(VLLM_COMMAND),
        "args": server_args(server, spec, adapters),
        "env": _env(spec),
        "ports": [{"name": inf.PORT_NAME, "containerPort": inf.PORT, "protocol": "TCP"}],
        "resources": {"requests": dict(amounts), "limits": dict(amounts)},
        "startupProbe": inf.probe(10, inf.STARTUP_SECONDS // 10, 5),
        "readinessProbe": inf.probe(5, 3, 5),
        "livenessProbe": inf.probe(15, 4, 10),
        "volumeMounts": [
            {"name": inf.MODELS_VOLUME, "mountPath": inf.MODELS_DIR, "readOnly": True},
            {"name": inf.HOME_VOLUME, "mountPath": inf.HOME_DIR},
            {"name": inf.SHM_VOLUME, "mountPath": "/dev/shm"},
        ],
        "securityContext": inf.container_security(read_only_root=False),
    }
    pod = {
        "automountServiceAccountToken": False,
        "enableServiceLinks": False,
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": inf.RUN_AS,
            "runAsGroup": inf.RUN_AS,
            "fsGroup": inf.RUN_AS,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "initContainers": _init_containers(image, spec, adapters),
        "containers": [container],
        "volumes": [
            {"name": inf.MODELS_VOLUME, "emptyDir": {}},
            {"name": inf.HOME_VOLUME, "emptyDir": {}},
            {"name": inf.SHM_VOLUME, "emptyDir": {"medium": "Memory"}},
        ],
    }
    obj = {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _meta(declaration),
        "spec": {
            "replicas": spec.replicas,
            "selector": {"matchLabels": selector(server)},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
            "progressDeadlineSeconds": inf.STARTUP_SECONDS,
            "revisionHistoryLimit": 3,
            "template": {"metadata": {"labels": server_labels(server)}, "spec": pod},
        },
    }
    return inf._with_hash(obj)


def service(declaration: dict[str, Any]) -> dict[str, Any]:
    server = declaration["metadata"]["name"]
    obj = {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _meta(declaration),
        "spec": {
            "type": "ClusterIP",
            "selector": selector(server),
            "ports": [{"name": inf.PORT_NAME, "port": inf.PORT, "targetPort": inf.PORT_NAME, "protocol": "TCP"}],
        },
    }
    return inf._with_hash(obj)


def served_models(dep: dict[str, Any]) -> set[str]:
    """The adapter model names in a server Deployment's current pod template (its --lora-modules)."""
    containers = (((dep.get("spec") or {}).get("template") or {}).get("spec") or {}).get("containers") or []
    args = (containers[0].get("args") or []) if containers else []
    out: set[str] = set()
    if "--lora-modules" in args:
        for a in args[args.index("--lora-modules") + 1 :]:
            if a.startswith("--"):
                break
            out.add(a.split("=", 1)[0])
    return out


__all__ = [
    "ADAPTERS_DIR",
    "Adapter",
    "COMPONENT",
    "CONVERSATIONAL_FORMATS",
    "DECLARATION_KEY",
    "InvalidDeclaration",
    "LABEL_SERVER",
    "REGISTRATION_KEY",
    "adapter_of",
    "declaration_spec",
    "job_template",
    "deployment",
    "endpoint",
    "refusal",
    "registration",
    "registration_name",
    "served_models",
    "server_args",
    "service",
    "template_digest",
    "template_mismatch",
    "usable_adapters",
]
