"""Generate the FineTuneJob CustomResourceDefinition from the API models.

The CRD's openAPIV3Schema is derived from ``kubetune.api`` so the two cannot drift; ``crds/finetunejob.yaml``
is this module's output, and a test fails when the committed file differs from a fresh rendering.
Run ``python -m kubetune.crd > crds/finetunejob.yaml`` after changing the API.
"""

from __future__ import annotations

import copy
import sys
from typing import Any

import yaml

from kubetune import api

# JSON Schema keywords a structural CRD schema accepts (Kubernetes 1.20).
_KEEP = {
    "type",
    "description",
    "enum",
    "minimum",
    "maximum",
    "exclusiveMinimum",
    "exclusiveMaximum",
    "minLength",
    "maxLength",
    "pattern",
    "minItems",
    "maxItems",
    "items",
    "properties",
    "additionalProperties",
    "required",
    "nullable",
    "default",
    "format",
    "not",
}


def _inline(schema: dict[str, Any], defs: dict[str, Any]) -> dict[str, Any]:
    """Resolve $ref, collapse Optional[...] into nullable, and keep only structural keywords."""
    s = dict(schema)
    if "$ref" in s:
        target = copy.deepcopy(defs[s.pop("$ref").split("/")[-1]])
        desc = s.get("description")
        s = {**target, **s}
        if desc:
            s["description"] = desc
    any_of = s.pop("anyOf", None)
    if any_of is not None:
        non_null = [x for x in any_of if x.get("type") != "null"]
        if len(non_null) != 1:
            raise ValueError(f"cannot express union in a structural schema: {any_of}")
        inner = _inline(non_null[0], defs)
        desc = s.get("description") or inner.get("description")
        s = {**inner, **{k: v for k, v in s.items() if k != "description"}}
        if desc:
            s["description"] = desc
        s["nullable"] = True
    if "const" in s:
        s["enum"] = [s.pop("const")]
    if "enum" in s and "type" not in s:
        kinds = {type(v) for v in s["enum"]}
        s["type"] = "integer" if kinds == {int} else "string"
    # OpenAPI v3.0 spells exclusive bounds as booleans beside minimum/maximum.
    if isinstance(s.get("exclusiveMinimum"), (int, float)) and not isinstance(s["exclusiveMinimum"], bool):
        s["minimum"], s["exclusiveMinimum"] = s["exclusiveMinimum"], True
    if isinstance(s.get("exclusiveMaximum"), (int, float)) and not isinstance(s["exclusiveMaximum"], bool):
        s["maximum"], s["exclusiveMaximum"] = s["exclusiveMaximum"], True
    if "properties" in s:
        s["properties"] = {k: _inline(v, defs) for k, v in s["properties"].items()}
        s["type"] = "object"
    if isinstance(s.get("items"), dict):
        s["items"] = _inline(s["items"], defs)
    if isinstance(s.get("additionalProperties"), dict):
        ap = s["additionalProperties"]
        if ap == {} or ("type" not in ap and "$ref" not in ap and "anyOf" not in ap):
            s.pop("additionalProperties")
            s["x-kubernetes-preserve-unknown-fields"] = True
        else:
            s["additionalProperties"] = _inline(ap, defs)
    elif s.get("additionalProperties") is True or (
        s.get("type") == "object" and "properties" not in s and "additionalProperties" not in s
    ):
        s.pop("additionalProperties", None)
        s["x-kubernetes-preserve-unknown-fields"] = True
    elif s.get("additionalProperties") is False:
        s.pop("additionalProperties")  # structural schemas forbid it; pruning removes unknown fields instead
    # Object defaults come from default_factory and are applied by the models; the server only needs scalars.
    if isinstance(s.get("default"), (dict, list)) or s.get("default", 0) is None:
        s.pop("default")
    # A v1.20 API server refuses empty-string defaults ("must be of type string: null"); "" is the unset value.
    if s.get("default", 0) == "":
        s.pop("default")
    keep = {k: v for k, v in s.items() if k in _KEEP or k.startswith("x-kubernetes-")}
    # Names the models refuse (inline credentials): declared so that pruning does not drop them silently, with
    # `not: {}` so that the API server refuses any value. Its message names the field and never the value.
    for name in s.get(api.REFUSED_PROPERTIES) or ():
        keep.setdefault("properties", {})[name] = {
            "type": "string",
            "not": {},
            "description": "Refused by the API server: " + api.INLINE_CREDENTIALS_MESSAGE + ".",
        }
    if "type" not in keep and "x-kubernetes-preserve-unknown-fields" not in keep:
        raise ValueError(f"schema without a type: {schema}")
    return keep


def model_schema(model: type[api.Model]) -> dict[str, Any]:
    """The structural schema of one API model."""
    raw = model.model_json_schema(by_alias=True, mode="validation")
    return _inline(raw, raw.get("$defs", {}))


def openapi_schema() -> dict[str, Any]:
    """The CRD's openAPIV3Schema for the whole FineTuneJob object."""
    spec = model_schema(api.FineTuneJobSpec)
    status = model_schema(api.FineTuneJobStatus)
    return {
        "type": "object",
        "description": "A fine-tune of a language model, from data in S3 to a served OpenAI-compatible endpoint.",
        "required": ["spec"],
        "properties": {
            "apiVersion": {"type": "string", "description": "API version: kubetune.io/v1alpha1."},
            "kind": {"type": "string", "description": "FineTuneJob."},
            "metadata": {"type": "object"},
            "spec": spec,
            "status": status,
        },
    }


PRINTER_COLUMNS = [
    {"name": "Status", "type": "string", "jsonPath": ".status.state", "description": "Summary of conditions."},
    {
        "name": "Progress",
        "type": "integer",
        "jsonPath": ".status.progress.percent",
        "description": "Share of training steps done (%).",
    },
    {"name": "Loss", "type": "number", "jsonPath": ".status.progress.loss", "description": "Training loss."},
    {
        "name": "ETA(s)",
        "type": "integer",
        "jsonPath": ".status.progress.etaSeconds",
        "description": "Estimated seconds of training left (the trainer's status.progress.etaSeconds).",
    },
    {"name": "Endpoint", "type": "string", "jsonPath": ".status.endpoint.url", "description": "OpenAI-compatible API."},
    {"name": "Age", "type": "date", "jsonPath": ".metadata.creationTimestamp"},
]


def crd_manifest() -> dict[str, Any]:
    """The FineTuneJob CustomResourceDefinition (apiextensions.k8s.io/v1)."""
    return {
        "apiVersion": "apiextensions.k8s.io/v1",
        "kind": "CustomResourceDefinition",
        "metadata": {"name": f"{api.PLURAL}.{api.GROUP}"},
        "spec": {
            "group": api.GROUP,
            "scope": "Namespaced",
            "names": {
                "kind": api.KIND,
                "listKind": f"{api.KIND}List",
                "plural": api.PLURAL,
                "singular": api.SINGULAR,
                "shortNames": list(api.SHORT_NAMES),
                "categories": ["kubetune"],
            },
            "versions": [
                {
                    "name": api.VERSION,
                    "served": True,
                    "storage": True,
                    "subresources": {"status": {}},
                    "additionalPrinterColumns": PRINTER_COLUMNS,
                    "schema": {"openAPIV3Schema": openapi_schema()},
                }
            ],
        },
    }


HEADER = "# Generated by `python -m kubetune.crd` from kubetune/api.py. Do not edit by hand.\n"


def render() -> str:
    """The CRD as the YAML committed in crds/finetunejob.yaml."""
    return HEADER + yaml.safe_dump(crd_manifest(), sort_keys=False, width=120)


if __name__ == "__main__":
    sys.stdout.write(render())
