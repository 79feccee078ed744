"""Every manifest docs/data.md, docs/preference.md and docs/tracking.md show (and examples/dpo.yaml) parses with the API models
and is stored by the real kube-apiserver through the generated CRD; a schema mistake in the new fields is
refused there naming the field."""

from __future__ import annotations

import copy
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune import api

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

ROOT = Path(__file__).resolve().parents[2]
MARK = "<!-- applied by tests/trainer_data/test_docs_data_examples.py -->"


def documented() -> list[dict[str, Any]]:
    out = []
    for doc in ("data.md", "preference.md", "tracking.md"):
        blocks = re.findall(re.escape(MARK) + r"\n```yaml\n(.*?)```", (ROOT / "docs" / doc).read_text(), re.S)
        assert blocks, f"docs/{doc} has no applied examples"
        out += [yaml.safe_load(b) for b in blocks]
    return out + [yaml.safe_load((ROOT / "examples" / "dpo.yaml").read_text())]


def _crd_api(control_plane: Any, k8s_client: Any) -> Any:
    from kubernetes import client

    control_plane.install_crds([ROOT / "crds" / "finetunejob.yaml"])
    return client.CustomObjectsApi(k8s_client)


def test_documented_manifests_parse_and_apply(control_plane, k8s_client, namespace):
    objs = documented()
    assert {o["metadata"]["name"] for o in objs} >= {
        "alpaca",
        "mixture",
        "base-with-template",
        "dpo-helpfulness",
        "dpo",
        "tracked",
        "gated-base",
    }
    crd = _crd_api(control_plane, k8s_client)
    for obj in objs:
        name, _, spec = api.parse_manifest(obj)
        assert api.cross_field_errors(spec) == [], name
        body = {**copy.deepcopy(obj), "metadata": {"name": name, "namespace": namespace}}
        stored = crd.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, body)
        # What the API server stored parses back to the same spec (nothing pruned by the schema).
        assert api.parse_spec(stored["spec"]) == spec, name
    mixture = next(o for o in objs if o["metadata"]["name"] == "mixture")
    stored = crd.get_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, "mixture")
    assert [s["weight"] for s in stored["spec"]["dataset"]["sources"]] == [3, 1]
    stored_fields = stored["spec"]["dataset"]["sources"][1]["fields"]
    assert mixture["spec"]["dataset"]["sources"][1]["fields"].items() <= stored_fields.items()


@pytest.mark.parametrize(
    "path,value,field",
    [
        (("dataset", "sources", 0, "weight"), 0, "spec.dataset.sources.weight"),  # 1.20 names no index
        (("dataset", "fileFormat"), "csv", "spec.dataset.fileFormat"),
        (("training", "objective"), "ppo", "spec.training.objective"),
        (("training", "dpo", "beta"), -1, "spec.training.dpo.beta"),
    ],
)
def test_schema_refuses_bad_new_fields_naming_them(path, value, field, control_plane, k8s_client, namespace):
    from kubernetes.client.rest import ApiException

    crd = _crd_api(control_plane, k8s_client)
    obj = copy.deepcopy(next(o for o in documented() if o["metadata"]["name"] == "mixture"))
    obj["spec"]["training"] = {"dpo": {}}
    node = obj["spec"]
    for key in path[:-1]:
        node = node[key]
    node[path[-1]] = value
    obj["metadata"] = {"name": "bad", "namespace": namespace}
    with pytest.raises(ApiException) as err:
        crd.create_namespaced_custom_object(api.GROUP, api.VERSION, namespace, api.PLURAL, obj)
    assert err.value.status == 422 and field in err.value.body, err.value.body
