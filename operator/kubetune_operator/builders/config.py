"""The ConfigMap holding the trainer's resolved config (`config.json`), mounted into every Ray pod.

Why a ConfigMap and not a long command line or env vars: the resolved config is a nested document with every
default filled in (kubetune.api.resolve_trainer_config), it is what the trainer validates against the same
models, and `kubectl get cm <job>-config -o yaml` shows exactly what a run was started with. It holds names
of Secrets, never their values.
"""

from __future__ import annotations

import json
from typing import Any

from kubetune import api
from kubetune_operator import names
from kubetune_operator.meta import Owner, object_meta

CONFIG_KEY = "config.json"
CONFIG_DIR = "/etc/kubetune"
CONFIG_PATH = f"{CONFIG_DIR}/{CONFIG_KEY}"


def trainer_config_json(owner: Owner, spec: api.FineTuneJobSpec) -> str:
    """The resolved trainer config as stable, human-readable JSON."""
    config = api.resolve_trainer_config(owner.name, owner.namespace, owner.uid or None, spec)
    return json.dumps(config.wire(), indent=2, sort_keys=True) + "\n"


def config_map(owner: Owner, spec: api.FineTuneJobSpec) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": object_meta(owner, names.config_map(owner.name), "training"),
        "data": {CONFIG_KEY: trainer_config_json(owner, spec)},
    }


def applied_spec(config_map_obj: dict[str, Any]) -> api.FineTuneJobSpec | None:
    """The spec a job's ConfigMap was built from (None when it cannot be read back)."""
    raw = (config_map_obj.get("data") or {}).get(CONFIG_KEY)
    if not raw:
        return None
    try:
        return api.TrainerConfig.model_validate(json.loads(raw)).spec
    except ValueError:
        return None
