"""The API models: defaults, field-named errors, cross-field rules, and no secret ever echoed."""

import copy

import pytest

from kubetune import api

pytestmark = pytest.mark.unit

GOOD = {
    "model": {"uri": "s3://models/smollm2-135m"},
    "dataset": {
        "train": "s3://data/chat/train.jsonl",
        "validationSplit": 0.1,
        "format": "chat",
        "endpoint": "http://127.0.0.1:8333",
        "credentialsSecret": "s3-creds",
    },
    "output": {"uri": "s3://outputs/runs"},
}


def with_(path: str, value, base=GOOD):
    spec = copy.deepcopy(base)
    node = spec
    keys = path.split(".")
    for k in keys[:-1]:
        node = node.setdefault(k, {})
    node[keys[-1]] = value
    return spec


def errors_of(spec) -> list[tuple[str, str]]:
    with pytest.raises(api.SpecError) as info:
        api.parse_spec(spec)
    return info.value.errors


def test_defaults_resolve():
    spec = api.parse_spec(GOOD)
    assert spec.training.method == "lora"
    assert spec.training.lora_settings.r == 16
    assert spec.training.deepspeed.zero_stage == 2
    assert spec.deploy.enabled and spec.deploy.mode is None
    assert spec.dataset.preprocessing.max_seq_length == 1024
    wire = spec.wire()
    assert wire["dataset"]["validationSplit"] == 0.1 and "credentialsSecret" in wire["dataset"]
    assert api.parse_spec(wire) == spec  # the wire form round-trips


@pytest.mark.parametrize(
    "spec, field",
    [
        (with_("training.learningRate", -0.1), "spec.training.learningRate"),
        (with_("training.epochs", "two"), "spec.training.epochs"),
        (with_("training.method", "sgd"), "spec.training.method"),
        (with_("resources.workers", 0), "spec.resources.workers"),
        (with_("resources.cpuPerWorker", "lots"), "spec.resources.cpuPerWorker"),
        (with_("training.deepspeed.zeroStage", 1), "spec.training.deepspeed.zeroStage"),
        (with_("dataset.train", "https://bucket/data"), "spec.dataset.train"),
        (with_("model.uri", "s3://Bad_Bucket/x"), "spec.model.uri"),
        (with_("dataset.format", "tsv"), "spec.dataset.format"),
        (with_("training.lora", {"r": 8}, with_("training.method", "full")), "spec.training.lora"),
        (with_("model.task", "sequence-classification"), "spec.model.numLabels"),
        (with_("dataset.validation", "s3://data/val.jsonl"), "spec.dataset.validationSplit"),
        (
            with_("training.earlyStopping", {"patience": 2}, with_("dataset.validationSplit", None)),
            "spec.training.earlyStopping",
        ),
        (with_("deploy.mode", "adapter", with_("training.method", "full")), "spec.deploy.mode"),
        (with_("training.unknownKnob", 3), "spec.training.unknownKnob"),
        (
            with_("dataset.preprocessing.maxChars", 5, with_("dataset.preprocessing.minChars", 10)),
            "spec.dataset.preprocessing.maxChars",
        ),
    ],
)
def test_invalid_specs_name_the_field(spec, field):
    assert field in [path for path, _ in errors_of(spec)]


def test_missing_dataset_is_named():
    spec = copy.deepcopy(GOOD)
    del spec["dataset"]
    assert ("spec.dataset", "Field required") in errors_of(spec)


def test_inline_credentials_are_refused_and_never_echoed():
    secret = "wJalrXUtnFEMI/K7MDENG/bPxRfiCYEXAMPLEKEY"
    errs = errors_of(with_("dataset.secretAccessKey", secret))
    assert errs[0][0] == "spec.dataset.secretAccessKey"
    assert "credentialsSecret" in errs[0][1]
    uri_errs = errors_of(with_("dataset.train", f"s3://AKIAEXAMPLE:{secret}@bucket/x"))
    assert uri_errs[0][0] == "spec.dataset.train"
    assert secret not in str(api.SpecError(errs + uri_errs))


def test_tuning_search_space_rules():
    tuning = {
        "trials": 2,
        "maxConcurrentTrials": 3,
        "searchSpace": {
            "learningRate": {"type": "loguniform", "low": 0.01, "high": 0.001},
            "lora.r": {"type": "choice", "values": []},
            "optimizer": {"type": "choice", "values": [1]},
            "perDeviceBatchSize": {"type": "uniform", "low": 1, "high": 4},
            "lora.alpha": {"type": "choice", "values": [8.5]},
        },
    }
    paths = [p for p, _ in errors_of(with_("tuning", tuning))]
    assert "spec.tuning.searchSpace.learningRate.low" in paths
    assert "spec.tuning.searchSpace.lora.r.values" in paths
    assert "spec.tuning.searchSpace.optimizer" in paths
    assert "spec.tuning.maxConcurrentTrials" in paths
    assert "spec.tuning.searchSpace.lora.alpha.values" in paths
    ok = {
        "trials": 4,
        "earlyStopping": "asha",
        "searchSpace": {
            "learningRate": {"type": "loguniform", "low": 1e-5, "high": 1e-3},
            "lora.r": {"type": "choice", "values": [4, 8]},
        },
    }
    assert api.parse_spec(with_("tuning", ok)).tuning.trials == 4


def test_tuning_needs_held_out_data():
    spec = with_(
        "tuning",
        {"searchSpace": {"learningRate": {"type": "choice", "values": [0.1]}}},
        with_("dataset.validationSplit", None),
    )
    assert "spec.tuning" in [p for p, _ in errors_of(spec)]


def test_manifest_envelope():
    with pytest.raises(api.SpecError) as info:
        api.parse_manifest(
            {"apiVersion": "kubetune.io/v1", "kind": "FineTuneJob", "metadata": {"name": "Bad_Name"}, "spec": GOOD}
        )
    paths = [p for p, _ in info.value.errors]
    assert paths == ["apiVersion", "metadata.name"]
    name, ns, spec = api.parse_manifest(
        {"apiVersion": api.API_VERSION, "kind": api.KIND, "metadata": {"name": "ok", "namespace": "team"}, "spec": GOOD}
    )
    assert (name, ns, spec.output.uri) == ("ok", "team", "s3://outputs/runs")


def test_trainer_config_paths():
    cfg = api.resolve_trainer_config("j1", "team", "uid-1", api.parse_spec(GOOD))
    assert cfg.run_uri == "s3://outputs/runs/team/j1/uid-1"  # each incarnation (uid) is a run of its own
    assert cfg.checkpoints_uri.endswith("/team/j1/uid-1/checkpoints")
    assert api.resolve_trainer_config("j1", "team", "uid-2", api.parse_spec(GOOD)).run_uri != cfg.run_uri
    with pytest.raises(ValueError):
        api.run_uri("s3://outputs/runs", "team", "j1", "../j2")  # a uid can never step out of the job's prefix
    again = api.TrainerConfig.model_validate_json(cfg.model_dump_json(by_alias=True))
    assert again == cfg
