"""Ranks = workers x ranks per pod: 2 pods x 2 ranks = 4 Ray Train workers, each on its own data shard.

The session's Ray cluster is one node (local Ray binds loopback only and then refuses a second node), so
the two pods are emulated (kubetune_trainer.layout): CPU slots (`ranksPerWorker: 2`) stand in for GPUs,
pod p holds world ranks 2p and 2p+1 as KubeRay's PACK placement gives them, and each emulated pod fetches
the base model into a node cache of its own. The run is ZeRO-3 full fine-tuning, so the model is
partitioned over 4 ranks as it loads and the export is gathered onto rank 0.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import BUCKET, TrainerEnv, assert_generates, fortunes, put_jsonl

pytestmark = [pytest.mark.training]


@pytest.mark.timeout(900)
def test_two_pods_of_two_ranks_train_on_disjoint_data(trainer_env: TrainerEnv, tmp_path: Path) -> None:
    from kubetune_trainer.data import load_shard

    env = trainer_env
    data = put_jsonl(
        env.client, f"s3://{BUCKET}/data/layout/fortunes.jsonl", [{"text": t} for t in fortunes("computers", limit=80)]
    )
    cfg = env.config(
        "layout-2x2",
        {
            "model": {"uri": env.model_uri},
            "dataset": {"train": data, "format": "completion", "preprocessing": {"maxSeqLength": 32}},
            "training": {
                "method": "full",
                "maxSteps": 3,
                "perDeviceBatchSize": 2,
                "learningRate": 1e-3,
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
        assert [ln["step"] for ln in lines] == [1, 2, 3]
        ids = load_shard([shards[rank]], env.client)["input_ids"]
        seen[rank] = {ids[r].tobytes() for ln in lines for r in ln["rows"]}
        assert len(seen[rank]) == 6  # 3 steps x 2 rows, no row repeated
    for a in range(4):
        for b in range(a + 1, 4):
            assert not seen[a] & seen[b], (a, b)
    print(f"4 ranks (2 emulated pods x 2): {sum(len(s) for s in seen.values())} distinct rows, none shared")

    finished = [m for m in env.metrics(cfg["runUri"]) if m.get("event") == "finished"][-1]
    peaks = finished["peakMemoryMB"]  # every rank's peak resident memory, in rank order
    print(f"peak memory per rank (ZeRO-3, 4 ranks): {peaks} MB")
    assert len(peaks) == 4 and all(p > 100 for p in peaks)

    model_dir = env.download(f"{cfg['runUri']}/model", tmp_path / "model")
    assert_generates(model_dir)  # the ZeRO-3 export gathered from 4 partitions loads and generates
