"""Pure builders: a FineTuneJob's spec in, the Kubernetes objects that run it out (plain dicts).

Why pure: everything the operator creates can be checked without a cluster (golden YAML files in
tests/golden/), and the handlers stay thin: parse, build, apply, report. Nothing here talks to the API.
"""

from __future__ import annotations

from typing import Any

from kubetune import api
from kubetune_operator.builders.config import config_map
from kubetune_operator.builders.network import head_network_policy
from kubetune_operator.builders.rayjob import ray_job
from kubetune_operator.builders.rbac import role, role_binding, service_account
from kubetune_operator.meta import Owner
from kubetune_operator.settings import Settings

__all__ = [
    "config_map",
    "head_network_policy",
    "ray_job",
    "role",
    "role_binding",
    "service_account",
    "training_children",
]


def training_children(
    owner: Owner, spec: api.FineTuneJobSpec, settings: Settings, spec_hash: str
) -> list[dict[str, Any]]:
    """Everything training needs, in creation order: what the RayJob's pods mount and run as comes first."""
    return [
        config_map(owner, spec),
        service_account(owner),
        role(owner),
        role_binding(owner),
        head_network_policy(owner, settings),
        ray_job(owner, spec, settings, spec_hash),
    ]
