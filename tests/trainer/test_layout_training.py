"""Ranks = workers x ranks per pod: 2 pods x 2 ranks = 4 Ray Train workers, each on its own data shard.

The session's Ray cluster is one node (local Ray binds loopback only and then refuses a second node), so
the two pods are emulated (kubetune_trainer.layout): CPU slots (`ranksPerWorker: 2`) stand in for GPUs,
pod p holds world ranks 2p and 2p+1 as KubeRay's PACK placement gives them, and each emulated pod fetches
the base model into a node cache of its own. The run is ZeRO-3 full fine-tuning, so the model is
partitioned over 4 ranks as it loads and the export is gathered onto rank 0.

The same run is the training matrix's chat row (tests/trainer/test_training.py): chat records from Parquet with
a separate validation file; the loss and the held-out loss go down, and the gathered full export holds trained
weights, carries the chat template and generates.
"""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
from trainer_helpers import BUCKET, TrainerEnv, assert_generates, fortunes, put_parquet

pytestmark = [pytest.mark.training]


@pytest.mark.timeout(900)
def test_two_pods_of_two_ranks_train_on_disjoint_data(trainer_env: TrainerEnv, tmp_path: Path) -> None:
    from kubetune_trainer.data import load_shard

    env = trainer_env
    records = [
        {
            "messages": [
                {"role": "user", "content": "Tell me something about science."},
                {"role": "assistant", "content": t},
            ]
        }
        for t in fortunes("science", limit=96)
    ]
    train = put_parquet(env.client, f"s3://{BUCKET}/data/layout/train.parquet", records[:88])
    validation = put_parquet(env.client, f"s3://{BUCKET}/data/layout/validation.parquet", records[88:])
    cfg = env.config(
        "layout-2x2",
        {
            "model": {"uri": env.model_uri},
            "dataset": {
                "train": train,
                "validation": validation,
                "format": "chat",
                "preprocessing": {"maxSeqLength": 48},
            },
            "training": {
                "method": "full",
                "maxSteps": 4,
                "perDeviceBatchSize": 2,
                "learningRate": 2e-3,
                "evalIntervalSteps": 2,
                "deepspeed": {"zeroStage": 3},
                "checkpoint": {"intervalSteps": 100},
            },
            # The session's cluster has 2 CPUs: 2 pods x 1 CPU, half a CPU per rank.
            "resources": {"workers": 2, "gpusPerWorker": 0, "ranksPerWorker": 2, "cpuPerWorker": "1"},
        },
    )
    trace = tmp_path / "trace"
    trace.mkdir()
    run = env.run(cfg, env={"KUBETUNE_TRACE_DIR": str(trace)})
    assert run.returncode == 0, run.output[-4000:]

    for rank in range(4):
        assert f"rank {rank} of 4: emulated pod {rank // 2} local rank {rank % 2}/2" in run.output
    # One node cache per emulated pod, each filled once.
    caches = sorted(p.name for p in (env.workdir / "model-cache").iterdir() if p.name.startswith("pod-"))
    assert caches == ["pod-0", "pod-1"]

    # Every rank trained, each on rows of its own shard only, and no row content on two ranks.
    manifests = [k for k in env.keys(cfg["runUri"]) if k.startswith("prepared/") and k.endswith("manifest.json")]
    (manifest,) = manifests
    shards = env.get_json(f"{cfg['runUri']}/{manifest}")["train_shards"]
    assert len(shards) == 4
    seen: dict[int, set[bytes]] = {}
    for rank in range(4):
        lines = [json.loads(ln) for ln in (trace / f"rank-{rank}.jsonl").read_text().splitlines()]
        assert {(ln["pod"], ln["localRank"]) for ln in lines} == {(rank // 2, rank % 2)}
        assert [ln["step"] for ln in lines] == [1, 2, 3, 4]
        ids = load_shard([shards[rank]], env.client)["input_ids"]
        seen[rank] = {ids[r].tobytes() for ln in lines for r in ln["rows"]}
        assert len(seen[rank]) == 8  # 4 steps x 2 rows, no row repeated
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b], (a, b)
    print(f"4 ranks (2 emulated pods x 2): {sum(len(s) for s in seen.values())} distinct rows, none shared")

    # The held-out rows likewise: each rank downloads and evaluates its own held-out shard, all of them together.
    prepared = env.get_json(f"{cfg['runUri']}/{manifest}")
    held_out = [
        re.search(rf"rank {r}: held-out rows (\d+) of (\d+) \(part-0000{r}\.parquet\)", run.output) for r in range(4)
    ]
    assert all(held_out), run.output[-4000:]
    assert {int(m.group(2)) for m in held_out if m} == {prepared["num_validation_sequences"]}
    assert sum(int(m.group(1)) for m in held_out if m) == prepared["num_validation_sequences"]

    finished = [m for m in env.metrics(cfg["runUri"]) if m.get("event") == "finished"][-1]
    peaks = finished["peakMemoryMB"]  # every rank's peak resident memory, in rank order
    print(f"peak memory per rank (ZeRO-3, 4 ranks): {peaks} MB")
    assert len(peaks) == 4 and all(p > 100 for p in peaks)

    steps = {m["step"]: m for m in env.metrics(cfg["runUri"]) if "loss" in m and "event" not in m}
    assert steps[4]["loss"] < steps[1]["loss"]
    assert steps[4]["evalLoss"] < steps[2]["evalLoss"]
    assert math.isclose(steps[4]["evalPerplexity"], math.exp(steps[4]["evalLoss"]), rel_tol=1e-6)

    keys = set(env.keys(f"{cfg['runUri']}/model"))
    assert {"config.json", "model.safetensors", "tokenizer.json", "chat_template.jinja"} <= keys
    model_dir = env.download(f"{cfg['runUri']}/model", tmp_path / "model")
    _assert_weights_changed(env, model_dir, tmp_path)
    assert_generates(model_dir)  # the ZeRO-3 export gathered from 4 partitions loads and generates


def _assert_weights_changed(env: TrainerEnv, model: Path, tmp_path: Path) -> None:
    """The ZeRO-3 export holds the full, trained weights (not empty shards, not the initial ones)."""
    from safetensors.torch import load_file

    trained = load_file(model / "model.safetensors")
    initial = load_file(env.download(env.model_uri, tmp_path / "initial") / "model.safetensors")
    name = "model.layers.0.self_attn.q_proj.weight"
    assert trained[name].shape == initial[name].shape
    assert not trained[name].equal(initial[name])
