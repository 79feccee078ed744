"""Resuming on a different number of ranks (kubetune_trainer.resize): a 2-rank ZeRO-2 run stops after its
step-3 checkpoint, and the same job comes back on 1 rank. The 1-rank run restores the weights, LR schedule and
RNG, continues the loss curve (its first loss is well below the untrained model's), and trains the rest of
the epoch on rows the 2 ranks had not trained on (by content: its data is prepared anew for 1 shard)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import BUCKET, TrainerEnv, fortunes, put_jsonl

pytestmark = [pytest.mark.training]


def _rows(env: TrainerEnv, run_uri: str, trace: Path, world: int) -> dict[int, list[bytes]]:
    """step -> contents of the rows trained on at that step, over all ranks (from the trace and the shards)."""
    from kubetune_trainer.data import load_shard

    manifests = [k for k in env.keys(run_uri) if k.startswith("prepared/") and k.endswith("manifest.json")]
    shards = {}
    for key in manifests:
        m = env.get_json(f"{run_uri}/{key}")
        if len(m["train_shards"]) == world:
            shards = {r: load_shard([u], env.client)["input_ids"] for r, u in enumerate(m["train_shards"])}
    out: dict[int, list[bytes]] = {}
    for rank in range(world):
        for line in (trace / f"rank-{rank}.jsonl").read_text().splitlines():
            rec = json.loads(line)
            out.setdefault(rec["step"], []).extend(shards[rank][r].tobytes() for r in rec["rows"])
    return out


@pytest.mark.timeout(1200)
def test_two_rank_checkpoint_resumes_on_one_rank(trainer_env: TrainerEnv, tmp_path: Path) -> None:
    env = trainer_env
    data = put_jsonl(
        env.client, f"s3://{BUCKET}/data/resize/fortunes.jsonl", [{"text": t} for t in fortunes("computers", limit=120)]
    )
    spec = {
        "model": {"uri": env.model_uri},
        "dataset": {"train": data, "format": "completion", "preprocessing": {"maxSeqLength": 32}},
        "training": {
            "method": "full",
            "maxSteps": 6,
            "perDeviceBatchSize": 2,
            "learningRate": 3e-3,
            "warmupRatio": 0.0,
            "scheduler": "constant",
            "deepspeed": {"zeroStage": 2},
            "checkpoint": {"intervalSteps": 3, "keep": 2},
            "maxWorkerRestarts": 0,
        },
    }
    two = env.config("resize", {**spec, "resources": {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": "1"}})
    trace_two, trace_one = tmp_path / "trace-2", tmp_path / "trace-1"
    trace_two.mkdir()
    trace_one.mkdir()
    first = env.run(two, env={"KUBETUNE_TRACE_DIR": str(trace_two), "KUBETUNE_FAIL_AFTER_STEP": "3"})
    assert first.returncode == 1 and "InjectedFailure" in first.final_line, first.output[-4000:]

    one = env.config("resize", {**spec, "resources": {"workers": 1, "gpusPerWorker": 0, "cpuPerWorker": "1"}})
    second = env.run(one, env={"KUBETUNE_TRACE_DIR": str(trace_one)})
    assert second.returncode == 0, second.output[-6000:]
    assert "from 2 to 1 ranks" in second.output

    steps = {m["step"]: m for m in env.metrics(two["runUri"]) if "loss" in m and "event" not in m}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    print("losses: " + ", ".join(f"{s}: {steps[s]['loss']:.3f}" for s in sorted(steps)))
    # The curve continues: step 4 (first on 1 rank) is far closer to step 3 than to the untrained step 1.
    assert steps[4]["loss"] < steps[1]["loss"]
    assert abs(steps[4]["loss"] - steps[3]["loss"]) < abs(steps[4]["loss"] - steps[1]["loss"])

    before = _rows(env, two["runUri"], trace_two, 2)
    after = _rows(env, one["runUri"], trace_one, 1)
    assert sorted(before) == [1, 2, 3] and sorted(after) == [4, 5, 6]
    seen_before = {r for rows in before.values() for r in rows}
    seen_after = [r for rows in after.values() for r in rows]
    assert len(seen_after) == len(set(seen_after)) == 6  # 3 steps x 2 rows, none repeated
    assert not seen_before & set(seen_after)  # no record trained on twice across the resize
