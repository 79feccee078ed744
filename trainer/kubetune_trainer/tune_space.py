"""What a tuning trial is: Tune's search space from spec.tuning, a trial's id, spec and run prefix, its
state, and which finished trial is best. Pure functions (Ray Tune is imported only to build domains)."""

from __future__ import annotations

import itertools
import math
from typing import Any, cast

from kubetune.api import TUNABLE_FIELDS, FineTuneJobSpec, TrainerConfig, TrialStatus, TuningSpec

TRIALS_DIR = "trials"

PENDING, RUNNING, TERMINATED, EARLY_STOPPED, ERROR = "PENDING", "RUNNING", "TERMINATED", "EARLY_STOPPED", "ERROR"


def search_space(tuning: TuningSpec) -> dict[str, Any]:
    """Tune's param_space for spec.tuning.searchSpace: {"params": {field: value or domain}}.

    Fields are taken in name order, as the API server returns them (it does not keep a map's key order), so
    a job samples the same trials from `kubetune run` and from the cluster. random: a domain per field
    (choice/uniform/loguniform/randint; integer fields stay integers; randint's high is inclusive, Tune's
    upper bound is not). grid: one `tune.grid_search` over every combination of the choice values like nested
    loops over the fields in name order (the last field varies fastest; each field's values in their order),
    so trial-00 is the first combination.
    """
    from ray import tune

    keys = sorted(tuning.search_space)
    if tuning.algorithm == "grid":
        values = [[_typed(k, v) for v in tuning.search_space[k].values or []] for k in keys]
        return {"params": tune.grid_search([dict(zip(keys, combo)) for combo in itertools.product(*values)])}
    space: dict[str, Any] = {}
    for key in keys:
        p = tuning.search_space[key]
        integer = TUNABLE_FIELDS[key] == "int"
        if p.type == "choice":
            space[key] = tune.choice([_typed(key, v) for v in p.values or []])
        elif p.type == "randint" or (integer and p.type == "uniform"):
            assert p.low is not None and p.high is not None  # parse_spec: a range needs low and high
            space[key] = tune.randint(int(math.ceil(p.low)), int(p.high) + 1)
        elif p.type == "loguniform":
            assert p.low is not None and p.high is not None  # parse_spec: a range needs low and high
            space[key] = (
                tune.lograndint(int(math.ceil(p.low)), int(p.high) + 1) if integer else tune.loguniform(p.low, p.high)
            )
        else:
            assert p.low is not None and p.high is not None  # parse_spec: a range needs low and high
            space[key] = tune.uniform(p.low, p.high)
    return {"params": space}


def _typed(key: str, value: float) -> int | float:
    return int(value) if TUNABLE_FIELDS[key] == "int" else float(value)


def grid_size(tuning: TuningSpec) -> int:
    return math.prod(len(p.values or []) for p in tuning.search_space.values())


def apply_params(spec: FineTuneJobSpec, params: dict[str, Any], max_steps: int | None) -> FineTuneJobSpec:
    """The spec a trial trains with: its parameters set on spec.training (dotted paths), the per-trial step
    budget, no tuning section. Validated again, so a sampled value breaks no field's own rule."""
    wire = spec.wire()
    wire.pop("tuning", None)
    training = wire.setdefault("training", {})
    for key, value in params.items():
        *parents, leaf = key.split(".")
        node = training
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = int(round(value)) if TUNABLE_FIELDS.get(key) == "int" else float(value)
    if max_steps is not None:
        training["maxSteps"] = max_steps
    return FineTuneJobSpec.model_validate(wire)


def trial_id_of(tune_trial_id: str) -> str:
    """`trial-07` for Tune's `<prefix>_00007` (BasicVariantGenerator numbers its trials from 0)."""
    tail = tune_trial_id.rsplit("_", 1)[-1]
    return f"trial-{int(tail):02d}" if tail.isdigit() else f"trial-{tune_trial_id}"


def trial_run_uri(cfg: TrainerConfig, trial_id: str) -> str:
    return f"{cfg.run_uri}/{TRIALS_DIR}/{trial_id}"


def trial_config(cfg: TrainerConfig, trial_id: str, params: dict[str, Any]) -> TrainerConfig:
    """The TrainerConfig of one trial: its spec, and its own run prefix."""
    assert cfg.spec.tuning is not None
    spec = apply_params(cfg.spec, params, cfg.spec.tuning.max_steps_per_trial)
    return TrainerConfig(job=cfg.job, spec=spec, run_uri=trial_run_uri(cfg, trial_id), reporting=cfg.reporting)


def planned_steps(spec: FineTuneJobSpec, rows_per_shard: int) -> int:
    """Optimizer steps a run of `spec` plans (train.train_loop's arithmetic), for progress and ASHA's horizon."""
    t = spec.training
    if t.max_steps:
        return t.max_steps
    micro = rows_per_shard // t.per_device_batch_size // t.gradient_accumulation_steps
    return max(1, math.ceil(t.epochs * micro))


def asha_bounds(cfg: TrainerConfig, steps: int) -> tuple[int, int]:
    """ASHA's (grace period, max_t) for trials of `steps` steps: grace = one evaluation interval, so every
    trial is compared at the same evaluation steps."""
    grace = max(1, min(cfg.spec.training.eval_interval_steps, steps))
    return grace, max(steps, grace)


def asha_milestones(grace: int, max_t: int, reduction_factor: float) -> list[int]:
    """The steps at which ASHA may stop a trial (ascending): the rungs of its single bracket, as Ray 2.60's
    ray/tune/schedulers/async_hyperband.py `_Bracket.__init__` makes them (s = 0): grace * rf**k for
    k < int(log(max_t / grace) / log(rf) + 1). ASHA decides at a trial's first result at or past a rung."""
    count = int(math.log(max_t / grace) / math.log(reduction_factor) + 1)
    return [int(grace * reduction_factor**k) for k in range(max(count, 0))]


def clean_params(params: dict[str, Any]) -> dict[str, float]:
    """Parameters as status shows them: integers for integer fields, 4 significant digits for floats."""
    out: dict[str, float] = {}
    for key, value in params.items():
        if TUNABLE_FIELDS.get(key) == "int":
            out[key] = int(round(value))
        else:
            out[key] = float(f"{float(value):.4g}")
    return out


def select_best(trials: list[TrialStatus], mode: str) -> TrialStatus | None:
    """The best finished trial (state TERMINATED, with an objective); ties go to the lower id."""
    done = [t for t in trials if t.state == TERMINATED and t.objective is not None and math.isfinite(t.objective)]
    if not done:
        return None
    sign = -1.0 if mode == "max" else 1.0
    return min(done, key=lambda t: (sign * cast(float, t.objective), t.id))  # done: objectives are set


def trial_state(tune_status: str, last_result: dict[str, Any] | None) -> str:
    """Our state for a Tune trial: TERMINATED only when it trained to the end (its final result arrived);
    a trial Tune terminated earlier was stopped by the scheduler."""
    if tune_status == "ERROR":
        return ERROR
    if tune_status == "TERMINATED":
        return TERMINATED if (last_result or {}).get("final") else EARLY_STOPPED
    return RUNNING if tune_status == "RUNNING" else PENDING
