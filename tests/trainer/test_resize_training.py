"""Resuming on a different number of ranks (kubetune_trainer.resize).

ZeRO-3: a 2-rank run stops after its step-3 checkpoint, and the same job comes back on 1 rank. The 1-rank run
rebuilds the weights and Adam's moments from both ranks' shards (what lands in the new partitions sums, squared,
to the checkpoint's), restores the LR schedule and RNG, continues the loss curve
(its first loss is well below the untrained model's), and trains the rest of the epoch on rows the 2 ranks had
not trained on (by content: its data is prepared anew for 1 shard), none twice.

ZeRO-2, the other way round (1 rank, then 2), with the same assertions: it runs the other ranks' side of the
collective load (rank 1 downloads only its RNG file and takes every weight from rank 0), and starting on 1
rank keeps this second case short. Both directions on both stages, and LoRA, were checked by hand (see
docs/scaling.md)."""

from __future__ import annotations

import json
import re
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


def _moment_sums(env: TrainerEnv, ds_uri: str, dest: Path) -> tuple[float, float]:
    """The sums of squares of Adam's exp_avg and exp_avg_sq over every old rank's optimizer file of a
    checkpoint (torch AdamW's flat state per partition; their padding is zero)."""
    import torch

    sums = [0.0, 0.0]
    for path in sorted(env.download(ds_uri, dest).glob("*optim_states.pt")):
        saved = torch.load(path, map_location="cpu", weights_only=False)["optimizer_state_dict"]
        inner = saved.get("base_optimizer_state") or saved["optimizer_state_dict"]  # ZeRO-2 / ZeRO-3
        for state in inner["state"].values():
            sums[0] += float(state["exp_avg"].double().pow(2).sum())
            sums[1] += float(state["exp_avg_sq"].double().pow(2).sum())
    return sums[0], sums[1]


@pytest.mark.timeout(1200)
@pytest.mark.parametrize(("stage", "before", "after"), [(3, 2, 1), (2, 1, 2)], ids=["zero3-2to1", "zero2-1to2"])
def test_checkpoint_resumes_on_another_number_of_ranks(
    trainer_env: TrainerEnv, tmp_path: Path, stage: int, before: int, after: int
) -> None:
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
            "deepspeed": {"zeroStage": stage},
            "checkpoint": {"intervalSteps": 3, "keep": 2},
            "maxWorkerRestarts": 0,
        },
    }
    name, res = f"resize-zero{stage}", {"gpusPerWorker": 0, "cpuPerWorker": "1"}
    old = env.config(name, {**spec, "resources": {"workers": before, **res}})
    trace_old, trace_new = tmp_path / "trace-old", tmp_path / "trace-new"
    trace_old.mkdir()
    trace_new.mkdir()
    first = env.run(old, env={"KUBETUNE_TRACE_DIR": str(trace_old), "KUBETUNE_FAIL_AFTER_STEP": "3"})
    assert first.returncode == 1 and "InjectedFailure" in first.final_line, first.output[-4000:]

    new = env.config(name, {**spec, "resources": {"workers": after, **res}})
    second = env.run(new, env={"KUBETUNE_TRACE_DIR": str(trace_new)})
    assert second.returncode == 0, second.output[-6000:]
    assert f"from {before} to {after} ranks (ZeRO-{stage})" in second.output
    restored = re.search(
        r"Adam's moments restored for \d+ parameters \(step 3; sum of squares over all partitions: "
        r"exp_avg (\S+), exp_avg_sq (\S+)\)",
        second.output,
    )
    assert restored, second.output[-6000:]
    saved = _moment_sums(env, f"{old['runUri']}/checkpoints/step-00000003/ds", tmp_path / "step-3")
    print(f"Adam's moments, sums of squares: checkpoint {saved}, restored {restored.groups()}")
    assert saved[0] > 0 and saved[1] > 0
    assert float(restored.group(1)) == pytest.approx(saved[0], rel=1e-6)
    assert float(restored.group(2)) == pytest.approx(saved[1], rel=1e-6)

    steps = {m["step"]: m for m in env.metrics(old["runUri"]) if "loss" in m and "event" not in m}
    assert sorted(steps) == [1, 2, 3, 4, 5, 6]
    print("losses: " + ", ".join(f"{s}: {steps[s]['loss']:.3f}" for s in sorted(steps)))
    # The curve continues: step 4 (the first after the resize) is far closer to step 3 than to the untrained step 1.
    assert steps[4]["loss"] < steps[1]["loss"]
    assert abs(steps[4]["loss"] - steps[3]["loss"]) < abs(steps[4]["loss"] - steps[1]["loss"])

    rows_before = _rows(env, old["runUri"], trace_old, before)
    rows_after = _rows(env, new["runUri"], trace_new, after)
    assert sorted(rows_before) == [1, 2, 3] and sorted(rows_after) == [4, 5, 6]
    seen_before = {r for rows in rows_before.values() for r in rows}
    seen_after = [r for rows in rows_after.values() for r in rows]
    assert len(seen_after) == len(set(seen_after)) == 3 * 2 * after  # 3 steps x 2 rows x ranks, none repeated
    assert not seen_before & set(seen_after)  # no record trained on twice across the resize
