"""The trainer's parts on their own: DeepSpeed config, schedule, early stopping, resources, error lines,
checkpoint selection and retention (real S3), and the once-per-node model cache (real S3, real processes).
"""

from __future__ import annotations

import json
import multiprocessing
import os
from pathlib import Path
from typing import Any

import pytest
from trainer_helpers import BUCKET

from kubetune.api import TrainerConfig, TrainingSpec

# ------------------------------------------------------------------------------------------ pure


@pytest.mark.unit
def test_deepspeed_config_on_cpu_and_gpu() -> None:
    from kubetune_trainer.deepspeed_config import deepspeed_config

    spec = TrainingSpec.model_validate(
        {
            "perDeviceBatchSize": 4,
            "gradientAccumulationSteps": 3,
            "maxGradNorm": 0.5,
            "weightDecay": 0.1,
            "deepspeed": {"zeroStage": 3, "offload": "cpu"},
        }
    )
    cpu = deepspeed_config(spec, world_size=2, use_gpu=False)
    assert cpu["train_batch_size"] == 24 and cpu["gradient_accumulation_steps"] == 3
    assert cpu["gradient_clipping"] == 0.5
    assert cpu["optimizer"] == {
        "type": "AdamW",
        "params": {"lr": 2e-4, "betas": [0.9, 0.999], "eps": 1e-8, "weight_decay": 0.1, "torch_adam": True},
    }
    assert cpu["bf16"] == {"enabled": False} and not cpu["fp16"]["enabled"]
    assert cpu["zero_optimization"]["stage"] == 3
    assert "offload_optimizer" not in cpu["zero_optimization"]  # offload is meaningless without GPUs
    assert cpu["zero_optimization"]["stage3_gather_16bit_weights_on_model_save"] is True
    assert cpu["zero_optimization"]["contiguous_gradients"] is True  # ZeRO-3: kept (not measured without it)
    assert cpu["zero_optimization"]["overlap_comm"] is False  # no streams on CPU: nothing to overlap

    gpu = deepspeed_config(spec, world_size=8, use_gpu=True)
    assert gpu["bf16"] == {"enabled": True} and "torch_adam" not in gpu["optimizer"]["params"]
    assert gpu["zero_optimization"]["offload_optimizer"]["device"] == "cpu"
    assert gpu["zero_optimization"]["offload_param"]["device"] == "cpu"

    two = deepspeed_config(TrainingSpec(), world_size=1, use_gpu=True)
    assert two["zero_optimization"]["stage"] == 2 and "offload_param" not in two["zero_optimization"]
    assert two["zero_optimization"]["contiguous_gradients"] is True and two["zero_optimization"]["overlap_comm"]
    # ZeRO-2 on CPU: no contiguous gradient buffer, only copies there (benchmarks/README.md)
    cpu_two = deepspeed_config(TrainingSpec(), world_size=2, use_gpu=False)["zero_optimization"]
    assert cpu_two["stage"] == 2 and cpu_two["contiguous_gradients"] is False and cpu_two["overlap_comm"] is False
    # torch's fused CUDA AdamW on GPUs: no DeepSpeed op to compile
    assert two["optimizer"]["params"]["torch_adam"] is True and two["optimizer"]["params"]["fused"] is True


@pytest.mark.unit
def test_precision_rules() -> None:
    from kubetune_trainer.deepspeed_config import resolve_precision

    assert resolve_precision("auto", use_gpu=False) == "fp32"
    assert resolve_precision("auto", use_gpu=True) == "bf16"
    assert resolve_precision("fp16", use_gpu=True) == "fp16"
    with pytest.raises(ValueError, match="needs GPUs"):
        resolve_precision("bf16", use_gpu=False)


@pytest.mark.unit
def test_learning_rate_schedule_warms_up_then_decays() -> None:
    import torch

    from kubetune_trainer.train import _lr_schedule

    param = torch.nn.Parameter(torch.zeros(1))
    for name, last in (("cosine", 0.0), ("linear", 0.0), ("constant", 1.0)):
        opt = torch.optim.AdamW([param], lr=1.0)
        sched = _lr_schedule(opt, TrainingSpec(scheduler=name, warmup_ratio=0.2), total_steps=10)
        lrs = []
        for _ in range(10):
            lrs.append(opt.param_groups[0]["lr"])
            opt.step()
            sched.step()
        assert lrs[0] == 0.0 and lrs[1] == 0.5 and lrs[2] == 1.0, (name, lrs)
        assert opt.param_groups[0]["lr"] == pytest.approx(last), name


@pytest.mark.unit
def test_early_stopping_counts_evaluations_without_improvement() -> None:
    from kubetune_trainer.checkpoint import TrainState
    from kubetune_trainer.train import _early_stopping

    training = TrainingSpec.model_validate({"earlyStopping": {"patience": 2, "minDelta": 0.1}})
    state = TrainState()
    assert [_early_stopping(training, state, x) for x in (3.0, 2.5, 2.45, 2.5)] == [False, False, False, True]
    assert state.best_eval_loss == 2.5 and state.evals_without_improvement == 2
    assert not _early_stopping(TrainingSpec(), TrainState(), 1.0)  # no rule, never stops


def _cfg(run_uri: str = f"s3://{BUCKET}/runs/ns/job", **resources: Any) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": "job", "namespace": "ns"},
            "spec": {
                "model": {"uri": f"s3://{BUCKET}/m"},
                "dataset": {"train": f"s3://{BUCKET}/d", "format": "completion"},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "deploy": {"enabled": False},
                "resources": resources or {"workers": 2},
            },
            "runUri": run_uri,
        }
    )


@pytest.mark.unit
def test_rank_resources() -> None:
    from kubetune_trainer.layout import rank_resources

    def res(cfg: TrainerConfig) -> Any:
        return cfg.spec.resources

    assert rank_resources(res(_cfg(workers=2, gpusPerWorker=0)), local=True) == {"CPU": 0.5}
    # A pod's whole CPUs (rounded down) shared by its ranks, one GPU each.
    assert rank_resources(res(_cfg(workers=2, cpuPerWorker="7500m", gpusPerWorker=2)), local=False) == {
        "CPU": 3.5,
        "GPU": 1.0,
    }
    assert rank_resources(res(_cfg(workers=1, cpuPerWorker="500m", gpusPerWorker=0)), local=False) == {"CPU": 1.0}


@pytest.mark.unit
def test_rank_layout_one_rank_per_gpu_packed_per_pod() -> None:
    from pydantic import ValidationError

    from kubetune.api import FineTuneJobSpec, ResourcesSpec
    from kubetune_trainer.layout import place, scaling_kwargs, world_size

    gpu = ResourcesSpec.model_validate({"workers": 2, "gpusPerWorker": 8, "cpuPerWorker": "64"})
    assert world_size(gpu) == 16
    assert scaling_kwargs(gpu, local=False) == {
        "num_workers": 16,
        "use_gpu": True,
        "resources_per_worker": {"CPU": 8.0, "GPU": 1.0},
        "placement_strategy": "PACK",
    }
    cpu = ResourcesSpec.model_validate({"workers": 2, "gpusPerWorker": 0, "ranksPerWorker": 2, "cpuPerWorker": "1"})
    assert world_size(cpu) == 4
    assert scaling_kwargs(cpu, local=False)["resources_per_worker"] == {"CPU": 0.5}
    assert scaling_kwargs(cpu, local=True)["resources_per_worker"] == {"CPU": 0.5}
    # Real pods: Ray's node and local ranks. One node for all 4 ranks of a 2-pod spec: emulated pods.
    assert (
        place(gpu, world_rank=9, world=16, local_rank=1, local_world=8, node_rank=1).describe()
        == "pod 1 local rank 1/8"
    )
    emulated = [place(cpu, world_rank=r, world=4, local_rank=r, local_world=4, node_rank=0) for r in range(4)]
    assert [(p.pod, p.local_rank, p.emulated) for p in emulated] == [
        (0, 0, True),
        (0, 1, True),
        (1, 0, True),
        (1, 1, True),
    ]
    with pytest.raises(ValidationError, match="spec.resources.ranksPerWorker"):
        FineTuneJobSpec.model_validate(
            {
                "model": {"uri": "s3://bkt/m"},
                "dataset": {"train": "s3://bkt/d.jsonl", "format": "completion"},
                "output": {"uri": "s3://bkt/o"},
                "resources": {"gpusPerWorker": 8, "ranksPerWorker": 4},
            }
        )


@pytest.mark.unit
def test_failures_become_one_line_and_an_exit_code() -> None:
    from ray.exceptions import RayTaskError
    from ray.train import WorkerGroupError

    from kubetune_trainer.__main__ import EXIT_DATA, EXIT_TRAINING, classify
    from kubetune_trainer.data import DataError

    inner = DataError("12% of records are invalid; most common: bad_json (line 3)")
    wrapped = RayTaskError("train_loop", "traceback...", inner).as_instanceof_cause()
    err = WorkerGroupError("rank 0 failed", {1: RuntimeError("peer gone"), 0: wrapped})
    assert classify(err) == (EXIT_DATA, "data", "12% of records are invalid; most common: bad_json (line 3)")
    assert classify(ValueError("boom\nmore")) == (EXIT_TRAINING, "training", "ValueError: boom")


@pytest.mark.unit
def test_bad_config_exits_2_naming_the_field(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune_trainer.__main__ import main

    cfg = _cfg().wire()
    cfg["spec"]["training"] = {"learningRate": 5}
    path = tmp_path / "c.json"
    path.write_text(json.dumps(cfg))
    assert main(["--config", str(path)]) == 2
    last = capsys.readouterr().out.strip().splitlines()[-1]
    assert last.startswith("kubetune-trainer: error: config: config.spec.training.learningRate"), last


# ------------------------------------------------------------------------------------------ real S3


@pytest.mark.integration
def test_only_complete_checkpoints_are_resumed_and_retention(s3_server: Any) -> None:
    from kubetune_trainer import checkpoint, storage

    client = s3_server.client()
    cfg = _cfg(run_uri=f"s3://{BUCKET}/runs/ns/retention")
    assert checkpoint.find_latest(client, cfg) is None

    def write(step: int, complete: bool) -> None:
        uri = checkpoint.checkpoint_uri(cfg, step)
        storage.put_json(client, f"{uri}/trainer_state.json", {"step": step})
        if complete:
            storage.put_json(client, f"{uri}/{checkpoint.COMPLETE}", {"step": step, "evalLoss": step / 10})

    for step, complete in ((10, True), (20, True), (25, False), (30, True), (40, False)):
        write(step, complete)
    assert checkpoint.find_latest(client, cfg) == checkpoint.checkpoint_uri(cfg, 30)  # 40 is half-written

    refs = checkpoint.apply_retention(client, cfg, keep=2)
    assert [(r.step, r.eval_loss) for r in refs] == [(30, 3.0), (20, 2.0)]
    left = sorted({o["rel"].split("/")[0] for o in storage.list_keys(client, cfg.checkpoints_uri)})
    # 10 is beyond retention, 25 is debris older than the newest complete one; 40 may still be in progress.
    assert left == ["step-00000020", "step-00000030", "step-00000040"]


def _fetch_in_process(args: tuple[dict[str, str], str, str, str]) -> tuple[str, str]:
    env, endpoint, uri, cache = args
    os.environ.update(env)
    from kubetune_trainer.data import s3_client
    from kubetune_trainer.model import fetch

    folder = fetch(s3_client(endpoint, "us-east-1"), uri, Path(cache), endpoint=endpoint)
    return str(folder), (folder / ".kubetune-complete").read_text()


@pytest.mark.integration
def test_model_is_downloaded_once_per_node(s3_server: Any, tmp_path: Path) -> None:
    """Four processes (workers on one node) fetch at once: one downloads, the rest wait and reuse it."""
    from kubetune_trainer import model, storage

    client = s3_server.client()
    uri = f"s3://{BUCKET}/models/cache-test"
    for name in ("config.json", "model.safetensors", "tokenizer.json"):
        storage.put_bytes(client, f"{uri}/{name}", os.urandom(300_000))
    cache = tmp_path / "cache"
    args = (s3_server.env(), s3_server.endpoint_url, uri, str(cache))
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        results = pool.map(_fetch_in_process, [args] * 4)
    folders = {folder for folder, _ in results}
    assert len(folders) == 1
    downloader_pids = {json.loads(marker)["pid"] for _, marker in results}
    assert len(downloader_pids) == 1, "more than one process downloaded the model"
    folder = Path(folders.pop())
    assert sorted(p.name for p in folder.iterdir() if not p.name.startswith(".")) == [
        "config.json",
        "model.safetensors",
        "tokenizer.json",
    ]

    # The tokenizer-only fetch is satisfied by the full download; a rewritten file is fetched again.
    assert (
        model.fetch(client, uri, cache, endpoint=s3_server.endpoint_url, only=frozenset({"tokenizer.json"})) == folder
    )
    storage.put_bytes(client, f"{uri}/config.json", b"{}")
    model.fetch(client, uri, cache, endpoint=s3_server.endpoint_url)
    assert (folder / "config.json").read_bytes() == b"{}"
