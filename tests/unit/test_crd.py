"""The CRD is generated from the API models: the committed file matches, and the schema says everything."""

import json
import pathlib

import jsonschema
import pytest
import yaml

from kubetune import api, crd

pytestmark = pytest.mark.unit
ROOT = pathlib.Path(__file__).resolve().parents[2]


def test_committed_crd_matches_the_models():
    committed = (ROOT / "crds" / "finetunejob.yaml").read_text()
    assert committed == crd.render(), "regenerate: python -m kubetune.crd > crds/finetunejob.yaml"


def _walk(schema, path="spec"):
    yield path, schema
    for key, sub in (schema.get("properties") or {}).items():
        yield from _walk(sub, f"{path}.{key}")
    if isinstance(schema.get("items"), dict):
        yield from _walk(schema["items"], f"{path}[]")
    if isinstance(schema.get("additionalProperties"), dict):
        yield from _walk(schema["additionalProperties"], f"{path}.*")


def test_every_spec_field_has_a_description_and_a_type():
    spec = crd.openapi_schema()["properties"]["spec"]
    for path, node in _walk(spec):
        if path.endswith(("[]", ".*")):
            continue  # list items and map values are described by their field
        assert node.get("description"), f"{path} has no description"
        assert "type" in node or node.get("x-kubernetes-preserve-unknown-fields"), f"{path} has no type"


def test_structural_schema_rules():
    text = json.dumps(crd.crd_manifest())
    assert "$ref" not in text and "anyOf" not in text and '"title"' not in text
    for path, node in _walk(crd.openapi_schema()["properties"]["spec"]):
        assert not ("properties" in node and "additionalProperties" in node), path


def _openapi_to_jsonschema(node):
    """OpenAPI v3.0 (nullable, boolean exclusive bounds) -> JSON Schema, to validate like the server does."""
    if isinstance(node, list):
        return [_openapi_to_jsonschema(x) for x in node]
    if not isinstance(node, dict):
        return node
    out = {k: _openapi_to_jsonschema(v) for k, v in node.items() if not k.startswith("x-kubernetes")}
    if out.pop("nullable", False) and "type" in out:
        out["type"] = [out["type"], "null"]
    for bound, ex in (("minimum", "exclusiveMinimum"), ("maximum", "exclusiveMaximum")):
        if out.get(ex) is True:
            out[ex] = out.pop(bound)
    return out


def test_schema_and_models_agree_on_examples():
    """Every example manifest is valid for both the CRD schema and the models (one contract, two forms)."""
    schema = _openapi_to_jsonschema(crd.openapi_schema())
    examples = sorted((ROOT / "examples").rglob("*.yaml"))
    checked = 0
    for path in examples:
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc or doc.get("kind") != api.KIND:
                continue
            jsonschema.validate(doc, schema)
            api.parse_manifest(doc)
            checked += 1
    assert checked >= 1 or not examples


def test_schema_refuses_what_the_models_refuse():
    schema = _openapi_to_jsonschema(crd.openapi_schema())
    doc = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "x"},
        "spec": {
            "model": {"uri": "s3://models/m"},
            "dataset": {"train": "s3://data/t", "format": "chat"},
            "output": {"uri": "s3://out/x"},
            "training": {"learningRate": 0},
        },
    }
    with pytest.raises(jsonschema.ValidationError):
        jsonschema.validate(doc, schema)
    with pytest.raises(api.SpecError):
        api.parse_manifest(doc)


def test_committed_reference_matches_the_models():
    from kubetune import reference

    committed = (ROOT / "docs" / "reference.md").read_text()
    assert committed == reference.render(), "regenerate: python -m kubetune.reference > docs/reference.md"
