"""Names of the objects the operator creates for a FineTuneJob.

Why derived, deterministic names: they make every create idempotent (a second create of the same child gets
409 Conflict instead of a duplicate, so a restarted operator can never double a RayJob), and let anyone find a
job's children without a lookup. Names are the parent's name plus a suffix, trimmed to fit; when trimmed, a
short hash of the untrimmed name is appended so that two long parents that share a prefix still differ.

Limits that apply here:
- most objects (ConfigMap, ServiceAccount, Role, RoleBinding): DNS-1123 label, at most 63 characters;
- the inference Service (and its Deployment, named alike): DNS-1035 label (starts with a letter), at most 63;
- label values: at most 63 characters;
- RayJob: KubeRay refuses names over 47 characters (it appends a suffix for the RayCluster and its Services,
  which must stay under 63) and names that are not DNS-1035 labels (must start with a letter).

Why a hash also where a prefix is added: a job named `7b` needs a DNS-1035 name for its RayJob and Service,
and a plain `ftj-7b` would be the very name of a job called `ftj-7b`. The prefixed form therefore always ends
in a hash of the job's own name (`ftj-7b-<hash>`), so two jobs never derive the same name (short of a job
named after that hash; even then the ownership check in `kubetune_operator.kube` leaves the other job's
object untouched and reports the conflict).
"""

from __future__ import annotations

import hashlib
import re

MAX_NAME = 63
MAX_RAYJOB_NAME = 47  # KubeRay's MaxRayJobNameLength (53 - 6)
_HASH_LEN = 8


def _digest(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()[:_HASH_LEN]


def trimmed(name: str, limit: int = MAX_NAME) -> str:
    """`name` if it fits in `limit`, else a prefix of it plus '-' and a hash of the whole name."""
    if len(name) <= limit:
        return name
    head = name[: limit - _HASH_LEN - 1].rstrip("-.")
    return f"{head}-{_digest(name)}"


def child_name(parent: str, suffix: str = "", limit: int = MAX_NAME) -> str:
    """The name of a child object: `<parent>-<suffix>` (or `<parent>`), at most `limit` characters."""
    return trimmed(f"{parent}-{suffix}" if suffix else parent, limit)


def config_map(job: str) -> str:
    """ConfigMap holding the resolved trainer config."""
    return child_name(job, "config")


def service_account(job: str) -> str:
    """ServiceAccount the trainer pods run as."""
    return child_name(job, "trainer")


def role(job: str) -> str:
    """Role letting the trainer read its job and patch its status."""
    return child_name(job, "trainer")


def role_binding(job: str) -> str:
    return child_name(job, "trainer")


def dns1035_base(job: str) -> str:
    """`job` when it starts with a letter, else `ftj-<job>-<hash of job>` (distinct from any job's own name)."""
    return job if re.match(r"^[a-z]", job) else f"ftj-{job}-{_digest(job)}"


def ray_job(job: str) -> str:
    """The RayJob: DNS-1035 (starts with a letter) and at most 47 characters, as KubeRay demands."""
    return trimmed(dns1035_base(job), MAX_RAYJOB_NAME)


def inference(job: str) -> str:
    """The inference Deployment and its Service (same name): a Service name must be a DNS-1035 label (start
    with a letter), so a job named like `7b-chat` gets `ftj-7b-chat-<hash>-inference`."""
    return child_name(dns1035_base(job), "inference")


def network_policy(job: str) -> str:
    """The NetworkPolicy that guards the job's Ray head."""
    return child_name(job, "ray-head")


def label_value(value: str) -> str:
    """A value that fits a label (63 characters); trimmed ones keep a hash so they stay distinct."""
    return trimmed(value, MAX_NAME)
