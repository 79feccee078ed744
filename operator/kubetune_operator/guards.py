"""Checks a job must pass before the operator makes anything for it: its credentials Secret, its images and
its output prefix. Pure functions plus one step (`guard`) that reads what they need.

- Credentials: `spec.dataset.credentialsSecret` must name a Secret in the job's namespace that holds
  AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY. Without the check a missing Secret leaves the RayJob's pods in
  CreateContainerConfigError and the job Initializing forever. A missing Secret or key sets `Blocked=True`
  (reason SecretNotFound / SecretKeyMissing, the message naming the Secret and the key) and the pass is
  retried every 15 s, so the condition appears within one pass and clears within 15 s of the fix.
  Least privilege: the operator needs `get` on Secrets (no list, no watch: it can read only a Secret whose
  name a job gives it, never enumerate them), bound only in the namespaces it watches. Key names are all it
  keeps of a Secret: the values are dropped as soon as the response is parsed and never logged.
  `spec.model.tokenSecretRef` (an hf:// model's access token) is checked the same way: the Secret and its key;
  `spec.tracking.mlflow.credentialsSecret` (MLflow's token or user and password): that the Secret exists.
- Images: every image a spec names (`spec.resources.images.*`) must come from a registry the chart allows
  (`allowedImageRegistries` -> KUBETUNE_ALLOWED_IMAGE_REGISTRIES); else the spec is invalid, naming the field
  (the webhook refuses it with the same function).
- Output: two live jobs (not yet Succeeded or Failed) whose output prefixes `<output>/<namespace>/<name>/`
  nest in one another are refused (Validated=False naming the other job): one could read, resume or delete
  the other's checkpoints and model.
"""

from __future__ import annotations

from typing import Any, cast

from kubetune import api
from kubetune_operator import conditions as c
from kubetune_operator.settings import Settings

REQUIRED_KEYS = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")
SECRET_RETRY_S = 15.0


def image_errors(spec: api.FineTuneJobSpec, settings: Settings) -> list[tuple[str, str]]:
    """(path, message) for each image of the spec outside the allowed registries (none when unrestricted)."""
    allowed = settings.allowed_image_registries
    if not allowed:
        return []
    errors = []
    for field, image in (("trainer", spec.resources.images.trainer), ("inference", spec.resources.images.inference)):
        if image and not image_allowed(image, allowed):
            errors.append(
                (
                    f"spec.resources.images.{field}",
                    f"image {image!r} is not from an allowed registry ({', '.join(allowed)})",
                )
            )
    return errors


def image_registry(image: str) -> str:
    """The registry host of an image reference (Docker's rule: the first part, if it looks like a host)."""
    first, sep, _ = image.partition("/")
    if sep and ("." in first or ":" in first or first == "localhost"):
        return first
    return "docker.io"


def image_allowed(image: str, allowed: tuple[str, ...]) -> bool:
    """An entry is a registry host (`ghcr.io`) or a host with a path prefix (`ghcr.io/kubetune`)."""
    registry = image_registry(image)
    path = image if image.startswith(registry + "/") else f"{registry}/{image}"
    for entry in allowed:
        entry = entry.rstrip("/")
        if registry == entry or path.startswith(entry + "/"):
            return True
    return False


def secret_problem(
    secret_name: str,
    namespace: str,
    secret: dict[str, Any] | None,
    field: str = "spec.dataset.credentialsSecret",
    keys: tuple[str, ...] = REQUIRED_KEYS,
) -> tuple[str, str] | None:
    """(reason, message) when the Secret or one of its `keys` is missing; None when it is usable. `field`: the
    spec field that names the Secret, for the message."""
    if secret is None:
        create = f"; create it with key{'s' if len(keys) > 1 else ''} {' and '.join(keys)}" if keys else ""
        return c.SECRET_NOT_FOUND, f"Secret {namespace}/{secret_name} ({field}) does not exist{create}"
    present = set(secret.get("data") or {}) | set(secret.get("stringData") or {})
    missing = [k for k in keys if k not in present]
    if missing:
        return c.SECRET_KEY_MISSING, (
            f"Secret {namespace}/{secret_name} ({field}) has no key {' and no key '.join(missing)}"
        )
    return None


def secrets_to_check(spec: api.FineTuneJobSpec) -> list[tuple[str, str, tuple[str, ...]]]:
    """(spec field, Secret name, keys it must hold) for every Secret the spec names."""
    out: list[tuple[str, str, tuple[str, ...]]] = []
    if spec.dataset.credentials_secret:
        out.append(("spec.dataset.credentialsSecret", spec.dataset.credentials_secret, REQUIRED_KEYS))
    token = spec.model.token_secret_ref
    if token is not None:
        out.append(("spec.model.tokenSecretRef", token.name, (token.key,)))
    mlflow = spec.tracking.mlflow if spec.tracking else None
    if mlflow is not None and mlflow.credentials_secret:
        # A token or a user name (and password): which, only the server knows; the Secret must exist.
        out.append(("spec.tracking.mlflow.credentialsSecret", mlflow.credentials_secret, ()))
    return out


def output_base(spec_output_uri: str, namespace: str, name: str) -> str:
    return f"{spec_output_uri.rstrip('/')}/{namespace}/{name}/"


def _age_key(meta: dict[str, Any]) -> tuple[str, str]:
    return (meta.get("creationTimestamp") or "", meta.get("uid") or "")


def overlapping_job(mine: dict[str, Any], output_uri: str, others: list[dict[str, Any]]) -> str | None:
    """`namespace/name` of an older live job whose output prefix nests with ours (`mine`: our metadata);
    None when there is none. Only older jobs count, so of two jobs the first one always keeps running."""
    namespace, name = mine.get("namespace", ""), mine.get("name", "")
    base = output_base(output_uri, namespace, name)
    for other in others:
        meta = other.get("metadata") or {}
        if meta.get("uid") == mine.get("uid") or meta.get("deletionTimestamp") or _age_key(meta) > _age_key(mine):
            continue
        conds = (other.get("status") or {}).get("conditions") or []
        if c.is_true(conds, c.SUCCEEDED) or c.is_true(conds, c.FAILED):
            continue
        uri = ((other.get("spec") or {}).get("output") or {}).get("uri")
        if not isinstance(uri, str):
            continue
        theirs = output_base(uri, meta.get("namespace", ""), meta.get("name", ""))
        if base.startswith(theirs) or theirs.startswith(base):
            return f"{meta.get('namespace')}/{meta.get('name')}"
    return None


def guard(ctx: Any) -> None:
    """The spec pass's step before anything is made (ctx: kubetune_operator.reconcile.Context).

    Images are checked on every pass; the output overlap and the credentials only until the RayJob exists
    (a running job is never held back by a later one, and its pods already hold what they need)."""
    from kubetune_operator.reconcile import Retry  # the step protocol; reconcile imports this module

    if c.is_true(ctx.status.get("conditions"), c.BLOCKED):
        # Cleared unless a check below (or a name conflict in the next step) sets it again: the last one wins.
        ctx.obs.extra_conditions.append((c.BLOCKED, c.FALSE, c.UNBLOCKED, "nothing blocks the run any more"))
    if ctx.spec is None:
        return
    errors = image_errors(ctx.spec, ctx.settings)
    if not errors and not ctx.status.get("specHash"):
        other = overlapping_job(ctx.body["metadata"], ctx.spec.output.uri, _live_jobs(ctx))
        if other:
            errors.append(
                (
                    "spec.output.uri",
                    f"{output_base(ctx.spec.output.uri, ctx.owner.namespace, ctx.owner.name)}"
                    f" overlaps the output prefix of the live FineTuneJob {other}; choose another "
                    "spec.output.uri (or job name)",
                )
            )
    if errors:
        ctx.errors.extend(errors)
        ctx.obs.spec_errors = list(ctx.errors)
        ctx.spec = None
        return
    if ctx.status.get("specHash"):
        return
    for field, secret_name, keys in secrets_to_check(ctx.spec):
        secret = ctx.kube.get_secret_keys(ctx.owner.namespace, secret_name)
        problem = secret_problem(secret_name, ctx.owner.namespace, secret, field, keys)
        if problem is not None:
            ctx.obs.extra_conditions.append((c.BLOCKED, c.TRUE, *problem))
            raise Retry(problem[1], delay=SECRET_RETRY_S)


def _live_jobs(ctx: Any) -> list[dict[str, Any]]:
    if ctx.live_jobs is not None:
        # The operator's index (kubetune_operator.jobindex): no request per new job, only the jobs that nest.
        return cast(
            "list[dict[str, Any]]",
            ctx.live_jobs.nesting(output_base(ctx.spec.output.uri, ctx.owner.namespace, ctx.owner.name)),
        )
    from kubetune_operator.kube import FINETUNEJOB

    namespaces = ctx.settings.namespaces or (None,)
    return [job for ns in namespaces for job in ctx.kube.list(FINETUNEJOB, ns)]
