"""spec.tuning without servers: invalid search spaces refused naming the field (API, `kubetune validate`, the
admission webhook's function, and the trainer before it starts Ray), and the pure parts of the tuning and
evaluation modules (search space -> Tune domains, trial specs, trial ids and states, best trial, held-out
prompts, improvement)."""

from __future__ import annotations

import copy
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from kubetune import api

pytestmark = pytest.mark.unit

ROOT = Path(__file__).resolve().parents[2]
GOOD = {
    "model": {"uri": "s3://models/smollm2-135m"},
    "dataset": {"train": "s3://data/chat/train.jsonl", "validationSplit": 0.1, "format": "chat"},
    "output": {"uri": "s3://outputs/runs"},
}
SPACE = "spec.tuning.searchSpace"


def _tuning(**tuning: Any) -> dict[str, Any]:
    spec = copy.deepcopy(GOOD)
    spec["tuning"] = tuning
    return spec


def _errors(spec: dict[str, Any]) -> list[tuple[str, str]]:
    with pytest.raises(api.SpecError) as info:
        api.parse_spec(spec)
    return info.value.errors


def _space(**params: Any) -> dict[str, Any]:
    return {k.replace("__", "."): v for k, v in params.items()}


INVALID = [
    ("empty-choice", _tuning(searchSpace=_space(lora__r={"type": "choice", "values": []})), f"{SPACE}.lora.r.values"),
    (
        "low-above-high",
        _tuning(searchSpace=_space(learningRate={"type": "loguniform", "low": 1e-2, "high": 1e-4})),
        f"{SPACE}.learningRate.low",
    ),
    (
        "low-equals-high",
        _tuning(searchSpace=_space(weightDecay={"type": "uniform", "low": 0.1, "high": 0.1})),
        f"{SPACE}.weightDecay.low",
    ),
    ("not-tunable", _tuning(searchSpace=_space(scheduler={"type": "choice", "values": [1]})), f"{SPACE}.scheduler"),
    ("not-a-field", _tuning(searchSpace=_space(optimizer={"type": "choice", "values": [1]})), f"{SPACE}.optimizer"),
    (
        "missing-bounds",
        _tuning(searchSpace=_space(learningRate={"type": "uniform", "low": 1e-4})),
        f"{SPACE}.learningRate",
    ),
    (
        "choice-with-bounds",
        _tuning(searchSpace=_space(lora__r={"type": "choice", "values": [4], "low": 1})),
        f"{SPACE}.lora.r",
    ),
    (
        "range-with-values",
        _tuning(searchSpace=_space(learningRate={"type": "uniform", "values": [1e-3], "low": 1e-4, "high": 1e-3})),
        f"{SPACE}.learningRate.values",
    ),
    (
        "loguniform-from-zero",
        _tuning(searchSpace=_space(weightDecay={"type": "loguniform", "low": 0, "high": 0.1})),
        f"{SPACE}.weightDecay.low",
    ),
    (
        "randint-on-float",
        _tuning(searchSpace=_space(learningRate={"type": "randint", "low": 1, "high": 3})),
        f"{SPACE}.learningRate",
    ),
    (
        "fractional-rank",
        _tuning(searchSpace=_space(lora__r={"type": "choice", "values": [4, 8.5]})),
        f"{SPACE}.lora.r.values",
    ),
    (
        "value-breaks-field-rule",
        _tuning(searchSpace=_space(learningRate={"type": "choice", "values": [1e-3, 2.0]})),
        f"{SPACE}.learningRate.values[1]",
    ),
    (
        "bound-breaks-field-rule",
        _tuning(searchSpace=_space(lora__r={"type": "randint", "low": 0, "high": 8})),
        f"{SPACE}.lora.r.low",
    ),
    (
        "grid-over-a-range",
        _tuning(algorithm="grid", searchSpace=_space(learningRate={"type": "uniform", "low": 1e-4, "high": 1e-3})),
        f"{SPACE}.learningRate",
    ),
    (
        "grid-trials-mismatch",
        _tuning(
            algorithm="grid",
            trials=3,
            searchSpace=_space(
                lora__r={"type": "choice", "values": [2, 4]}, learningRate={"type": "choice", "values": [1e-3, 1e-2]}
            ),
        ),
        "spec.tuning.trials",
    ),
    (
        "concurrency-above-trials",
        _tuning(trials=2, maxConcurrentTrials=3, searchSpace=_space(lora__r={"type": "choice", "values": [2]})),
        "spec.tuning.maxConcurrentTrials",
    ),
    (
        "lora-field-with-full",
        {**_tuning(searchSpace=_space(lora__r={"type": "choice", "values": [2]})), "training": {"method": "full"}},
        f"{SPACE}.lora.r",
    ),
    (
        "accuracy-for-causal-lm",
        _tuning(
            objective={"metric": "accuracy", "mode": "max"},
            searchSpace=_space(lora__r={"type": "choice", "values": [2]}),
        ),
        "spec.tuning.objective.metric",
    ),
    (
        "loss-maximised",
        _tuning(
            objective={"metric": "evalLoss", "mode": "max"},
            searchSpace=_space(lora__r={"type": "choice", "values": [2]}),
        ),
        "spec.tuning.objective.mode",
    ),
    ("empty-space", _tuning(searchSpace={}), "spec.tuning.searchSpace"),
    (
        "no-held-out-data",
        {
            **_tuning(searchSpace=_space(lora__r={"type": "choice", "values": [2]})),
            "dataset": {"train": "s3://data/chat/train.jsonl", "format": "chat"},
        },
        "spec.tuning",
    ),
]


@pytest.mark.parametrize(("case", "spec", "field"), INVALID, ids=[c[0] for c in INVALID])
def test_invalid_search_space_names_the_field(case: str, spec: dict[str, Any], field: str) -> None:
    paths = [p for p, _ in _errors(spec)]
    assert field in paths, paths


def test_valid_search_spaces() -> None:
    grid = api.parse_spec(
        _tuning(
            algorithm="grid",
            trials=4,
            maxConcurrentTrials=2,
            earlyStopping="asha",
            searchSpace=_space(
                lora__r={"type": "choice", "values": [2, 4]}, learningRate={"type": "choice", "values": [1e-3, 0.5]}
            ),
        )
    )
    assert grid.tuning.trials == 4
    rnd = api.parse_spec(
        _tuning(
            trials=6,
            searchSpace=_space(
                learningRate={"type": "loguniform", "low": 1e-5, "high": 1e-3},
                lora__r={"type": "randint", "low": 4, "high": 16},
                lora__dropout={"type": "uniform", "low": 0.0, "high": 0.2},
                perDeviceBatchSize={"type": "choice", "values": [2, 4]},
            ),
        )
    )
    assert list(rnd.tuning.search_space) == ["learningRate", "lora.r", "lora.dropout", "perDeviceBatchSize"]


def test_validate_and_webhook_and_trainer_refuse_before_anything_runs(tmp_path: Path) -> None:
    """`kubetune validate` and the admission webhook say the same thing; the trainer refuses the config with
    exit 2 before it starts Ray."""
    from kubetune_operator.webhook import admission_errors

    manifest = {
        "apiVersion": api.API_VERSION,
        "kind": api.KIND,
        "metadata": {"name": "bad-space"},
        "spec": _tuning(
            algorithm="grid",
            trials=2,
            searchSpace=_space(
                lora__r={"type": "choice", "values": []},
                learningRate={"type": "loguniform", "low": 1e-2, "high": 1e-4},
                optimizer={"type": "choice", "values": [1]},
            ),
        ),
    }
    errors = admission_errors("CREATE", manifest, None)
    paths = [p for p, _ in errors]
    assert {f"{SPACE}.lora.r.values", f"{SPACE}.learningRate.low", f"{SPACE}.optimizer"} <= set(paths), errors
    webhook = "; ".join(m if m.startswith(p) else f"{p}: {m}" for p, m in errors)

    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump(manifest, sort_keys=False))
    t0 = time.monotonic()
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_cli.main", "validate", str(path)],
        capture_output=True,
        text=True,
        timeout=60,
        cwd=tmp_path,
    )
    assert proc.returncode == 2, proc.stdout + proc.stderr
    said = " ".join((proc.stdout + proc.stderr).split())  # the console wraps long lines
    assert webhook in said, f"validate said:\n{said}\nthe webhook says:\n{webhook}"

    config = tmp_path / "config.json"
    config.write_text(
        json.dumps(
            {
                "job": {"name": "bad-space", "namespace": "default"},
                "spec": manifest["spec"],
                "runUri": "s3://outputs/runs/default/bad-space",
            }
        )
    )
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    proc = subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--local"],
        capture_output=True,
        text=True,
        timeout=120,
        env=env,
        cwd=tmp_path,
    )
    out = proc.stdout + proc.stderr
    assert proc.returncode == 2, out
    assert "kubetune-trainer: error: config:" in out and f"{SPACE}.lora.r.values" in out, out
    assert "Ray" not in out and time.monotonic() - t0 < 60


# ------------------------------------------------------------------------------------- tune_space.py


def _spec(**tuning: Any) -> api.FineTuneJobSpec:
    return api.parse_spec(_tuning(**tuning))


def test_search_space_maps_to_tune_domains() -> None:
    from ray.tune.search.sample import Categorical, Float, Integer
    from ray.tune.search.variant_generator import generate_variants

    from kubetune_trainer.tune_space import grid_size, search_space

    rnd = _spec(
        trials=3,
        searchSpace=_space(
            learningRate={"type": "loguniform", "low": 1e-5, "high": 1e-3},
            lora__r={"type": "randint", "low": 4, "high": 16},
            lora__alpha={"type": "uniform", "low": 8, "high": 32},
            weightDecay={"type": "uniform", "low": 0.0, "high": 0.1},
            perDeviceBatchSize={"type": "choice", "values": [2, 4]},
        ),
    )
    space = search_space(rnd.tuning)["params"]
    assert isinstance(space["learningRate"], Float) and space["learningRate"].lower == 1e-5
    assert isinstance(space["lora.r"], Integer) and (space["lora.r"].lower, space["lora.r"].upper) == (4, 17)
    assert isinstance(space["lora.alpha"], Integer)  # an integer field sampled uniformly stays an integer
    assert isinstance(space["weightDecay"], Float)
    assert isinstance(space["perDeviceBatchSize"], Categorical)
    assert space["perDeviceBatchSize"].categories == [2, 4]

    grid = _spec(
        algorithm="grid",
        trials=4,
        searchSpace=_space(
            lora__r={"type": "choice", "values": [2, 4]}, learningRate={"type": "choice", "values": [1e-3, 0.5]}
        ),
    )
    variants = [v["params"] for _, v in generate_variants(search_space(grid.tuning))]
    assert grid_size(grid.tuning) == 4
    # Nested loops over the fields in name order, whatever the spec's order (the API server sorts map keys):
    # the last field varies fastest. The tuning test relies on it.
    assert variants == [
        {"learningRate": 1e-3, "lora.r": 2},
        {"learningRate": 1e-3, "lora.r": 4},
        {"learningRate": 0.5, "lora.r": 2},
        {"learningRate": 0.5, "lora.r": 4},
    ]
    assert [list(v) for v in variants] == [["learningRate", "lora.r"]] * 4


def test_trial_config_applies_params_to_training() -> None:
    from kubetune_trainer.tune_space import apply_params, planned_steps, trial_config, trial_id_of

    spec = _spec(trials=2, maxStepsPerTrial=12, searchSpace=_space(lora__r={"type": "choice", "values": [2, 4]}))
    cfg = api.resolve_trainer_config("job", "team", "uid", spec)
    tcfg = trial_config(cfg, "trial-01", {"lora.r": 4.0, "learningRate": 0.003, "perDeviceBatchSize": 2.0})
    t = tcfg.spec.training
    assert (t.lora_settings.r, t.learning_rate, t.per_device_batch_size, t.max_steps) == (4, 0.003, 2, 12)
    assert isinstance(t.lora_settings.r, int) and t.lora_settings.alpha == 32  # the rest stays the spec's
    assert tcfg.spec.tuning is None and tcfg.job == cfg.job
    assert tcfg.run_uri == "s3://outputs/runs/team/job/uid/trials/trial-01"
    assert tcfg.checkpoints_uri == "s3://outputs/runs/team/job/uid/trials/trial-01/checkpoints"
    assert tcfg.eval_uri == "s3://outputs/runs/team/job/uid/trials/trial-01/eval"
    with pytest.raises(ValueError):
        apply_params(spec, {"learningRate": 3.0}, None)  # a sampled value still obeys the field's rule
    assert trial_id_of("a1b2c_00007") == "trial-07" and trial_id_of("a1b2c_00123") == "trial-123"
    assert planned_steps(tcfg.spec, rows_per_shard=100) == 12
    epochs = apply_params(spec, {"perDeviceBatchSize": 4}, None)
    assert planned_steps(epochs, rows_per_shard=100) == 25  # 1 epoch of 100 rows in batches of 4


def test_best_trial_is_the_best_finished_one() -> None:
    from kubetune_trainer.tune_space import select_best, trial_state

    T = api.TrialStatus
    trials = [
        T(id="trial-00", objective=3.1, state="TERMINATED", step=6),
        T(id="trial-01", objective=2.9, state="TERMINATED", step=6),
        T(id="trial-02", objective=1.0, state="EARLY_STOPPED", step=2),  # an earlier step, and no model
        T(id="trial-03", objective=None, state="ERROR"),
        T(id="trial-04", objective=2.9, state="TERMINATED", step=6),
    ]
    assert select_best(trials, "min").id == "trial-01"  # ties go to the lower id
    assert select_best(trials, "max").id == "trial-00"
    assert select_best(trials[2:4], "min") is None
    assert trial_state("TERMINATED", {"final": 1}) == "TERMINATED"
    assert trial_state("TERMINATED", {"final": 0, "step": 2}) == "EARLY_STOPPED"
    assert trial_state("ERROR", None) == "ERROR" and trial_state("RUNNING", None) == "RUNNING"


# -------------------------------------------------------------------------------------- evaluate.py


def test_improvement_is_positive_when_better() -> None:
    from kubetune_trainer.evaluate import improvement, objective_metric, summary, tune_safe

    assert improvement("evalLoss", 4.5, 3.9) == pytest.approx(0.6)
    assert improvement("perplexity", 90.0, 50.0) == pytest.approx(40.0)
    assert improvement("accuracy", 0.5, 0.8) == pytest.approx(0.3)
    assert improvement("evalLoss", 4.5, float("nan")) is None and improvement("evalLoss", None, 3.0) is None
    s = summary({"base": {"evalLoss": 4.5}, "fineTuned": {"evalLoss": 4.6}}, "evalLoss", "s3://b/r.json")
    assert s.wire() == {
        "metric": "evalLoss",
        "base": 4.5,
        "fineTuned": 4.6,
        "improvement": pytest.approx(-0.1),
        "reportUri": "s3://b/r.json",
    }
    assert tune_safe({"evalLoss": float("nan"), "accuracy": float("nan"), "perplexity": 3.0}) == {
        "evalLoss": float("inf"),
        "accuracy": 0.0,
        "perplexity": 3.0,
    }
    assert objective_metric(api.parse_spec(GOOD)) == "evalLoss"
    assert (
        objective_metric(
            _spec(objective={"metric": "perplexity"}, searchSpace=_space(lora__r={"type": "choice", "values": [2]}))
        )
        == "perplexity"
    )


def test_held_out_prompts_come_from_the_validation_rows() -> None:
    from kubetune_trainer.evaluate import COMPLETION_PROMPT_TOKENS, NEW_TOKENS, held_out_examples

    # Two packed rows: row 0 holds an instruction example (3 prompt tokens, 2 targets) then a completion-like
    # one (all targets); row 1 one long completion example; padding is segment 0.
    ids = np.array([[1, 2, 3, 4, 5, 6, 7, 8, 9, 0], list(range(100, 140))[:10]])
    labels = np.array([[-100, -100, -100, 4, 5, 6, 7, 8, 9, -100], list(range(100, 110))])
    seg = np.array([[1, 1, 1, 1, 1, 2, 2, 2, 2, 0], [1] * 10])
    data = {"input_ids": ids, "labels": labels, "segment_ids": seg}
    out = held_out_examples(data, classification=False, k=3)
    assert out[0] == {"prompt": [1, 2, 3], "reference": [4, 5]}
    assert out[1] == {"prompt": [6, 7], "reference": [8, 9]}  # completion: the first half as the prompt
    assert out[2]["prompt"] == list(range(100, 105)) and out[2]["reference"] == list(range(105, 110))
    # Completion records whose first token is no target (nothing precedes it in its packed segment).
    labels[1, 0] = -100
    out = held_out_examples(data, classification=False, k=3, completion=True)
    assert out[2]["prompt"] == list(range(100, 105))
    assert COMPLETION_PROMPT_TOKENS >= 5 and NEW_TOKENS >= 2
    cls = {
        "input_ids": np.array([[5, 6, 7, 0], [8, 9, 0, 0]]),
        "attention_mask": np.array([[1, 1, 1, 0], [1, 1, 0, 0]]),
        "label": np.array([1, 0]),
    }
    assert held_out_examples(cls, classification=True) == [{"ids": [5, 6, 7], "label": 1}, {"ids": [8, 9], "label": 0}]


def test_the_tuning_example_samples_valid_trials() -> None:
    """examples/lora-tuning.yaml: valid, and every configuration Tune samples from it is a valid training spec;
    the same seed samples the same configurations (so a retried driver's trial-03 is the same trial-03)."""
    from ray.tune.search.variant_generator import generate_variants

    from kubetune_trainer.tune_space import search_space, trial_config

    name, namespace, spec = api.parse_manifest(yaml.safe_load((ROOT / "examples" / "lora-tuning.yaml").read_text()))
    cfg = api.resolve_trainer_config(name, namespace, None, spec)

    def sample(seed: int) -> list[dict[str, Any]]:
        rng = np.random.default_rng(seed)  # what BasicVariantGenerator(random_state=seed) draws from
        return [
            v["params"]
            for _ in range(spec.tuning.trials)
            for _, v in generate_variants(search_space(spec.tuning), random_state=rng)
        ]

    configs = sample(spec.training.seed)
    assert len(configs) == 8 and len({json.dumps(c, sort_keys=True) for c in configs}) == 8
    for i, params in enumerate(configs):
        t = trial_config(cfg, f"trial-{i:02d}", params).spec.training
        assert 1e-5 <= t.learning_rate <= 1e-3 and t.lora_settings.r in (8, 16, 32)
        assert 0.0 <= t.lora_settings.dropout <= 0.1 and t.max_steps == 400
    assert sample(spec.training.seed) == configs


@pytest.mark.parametrize("grace,max_t", [(2, 6), (1, 1), (2, 50), (10, 100), (5, 5), (3, 82), (1, 81)])
def test_asha_milestones_are_ray_tunes_rungs(grace: int, max_t: int) -> None:
    """The steps at which a trial's workers wait for Tune's verdict are exactly the rungs of Ray's ASHA."""
    from ray.tune.schedulers.async_hyperband import _Bracket

    from kubetune_trainer.tune import ASHA_REDUCTION_FACTOR
    from kubetune_trainer.tune_space import asha_milestones

    bracket = _Bracket(grace, max_t, ASHA_REDUCTION_FACTOR, 0, stop_last_trials=False)
    assert asha_milestones(grace, max_t, ASHA_REDUCTION_FACTOR) == sorted(int(m) for m, _ in bracket._rungs)
