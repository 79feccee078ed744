"""ZeRO-3 the way DeepSpeed and transformers intend: the model is partitioned across the ranks as it loads,
and the export gathers it layer by layer onto rank 0 only.

Two real ranks (processes over gloo, as Ray Train's workers are) load a random Llama of a few hundred MB
through the trainer's own `model.load_model` with its ZeRO-3 DeepSpeed config. Each rank samples its
anonymous resident memory (RssAnon: the process's own memory, not the page cache the checkpoint file is read
through) while it loads, after a warm-up load of a tiny model so that imports and lazy set-up are not counted.
glibc is told to give large freed blocks back to the OS (MALLOC_MMAP_THRESHOLD_), so the figure is what the
rank needs, not what the allocator kept.
"""

from __future__ import annotations

import importlib
import json
import os
import threading
import time
from pathlib import Path
from typing import Any

import pytest

pytestmark = [pytest.mark.training]

WORLD = 2


def _anon_kb() -> int:
    with open("/proc/self/status") as fh:
        for line in fh:
            if line.startswith("RssAnon:"):
                return int(line.split()[1])
    return 0


def _spec(stage: int) -> Any:
    from kubetune.api import FineTuneJobSpec

    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "s3://bucket/model"},
            "output": {"uri": "s3://bucket/out"},
            "dataset": {"train": "s3://bucket/data.jsonl", "format": "completion"},
            "training": {"method": "full", "deepspeed": {"zeroStage": stage}},
        }
    )


def _rank(rank: int, port: int, big: str, tiny: str, out: str) -> None:
    """One rank: warm-up load, measured partitioned load, DeepSpeed engine, export gather."""
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(WORLD),
        LOCAL_RANK=str(rank),
        DS_ACCELERATOR="cpu",
    )
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None  # gloo needs no shm extension
    import deepspeed
    import torch

    from kubetune_trainer import model as model_lib
    from kubetune_trainer.deepspeed_config import deepspeed_config
    from kubetune_trainer.export import gather_state_dict

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    spec = _spec(3)
    ds = deepspeed_config(spec.training, world_size=WORLD, use_gpu=False)
    model_lib.load_model(spec, tiny, precision="fp32", pad_token_id=None, ds_config=ds)  # warm-up, dropped
    import gc

    gc.collect()

    peak, stop = [0], threading.Event()

    def sample() -> None:
        while not stop.is_set():
            peak[0] = max(peak[0], _anon_kb())
            time.sleep(0.002)

    base = _anon_kb()
    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    model = model_lib.load_model(spec, big, precision="fp32", pad_token_id=None, ds_config=ds)
    stop.set()
    sampler.join()
    peak_mb = (max(peak[0], _anon_kb()) - base) / 1024
    held = sum(p.ds_tensor.numel() * p.element_size() for p in model.parameters())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters()], config=ds)
    state = gather_state_dict(engine, rank=rank, trainable_only=False)
    result: dict[str, Any] = {
        "rank": rank,
        "loadPeakMB": round(peak_mb, 1),
        "heldMB": round(held / 2**20, 1),
        "gatheredHere": state is not None,
    }
    if rank == 0:
        from safetensors.torch import load_file

        reference = load_file(str(Path(big) / "model.safetensors"))
        result["missing"] = sorted(set(reference) - set(state))
        result["different"] = sorted(k for k in reference if k in state and not torch.equal(reference[k], state[k]))
        result["dtypes"] = sorted({str(t.dtype) for t in state.values()})
    Path(out, f"rank-{rank}.json").write_text(json.dumps(result))
    # Leave together and tear gloo down before the interpreter does: a rank that exits while its peer still
    # gathers can die in gloo's static destructors (SIGABRT, "terminate called without an active exception").
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def _random_llama(folder: Path, **shape: int) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        num_attention_heads=16, num_key_value_heads=16, vocab_size=8192, tie_word_embeddings=True, **shape
    )
    LlamaForCausalLM(config).save_pretrained(folder)
    return folder


def test_zero3_loads_partitioned_and_exports_the_unsharded_weights(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import socket

    import torch.multiprocessing as mp

    big = _random_llama(tmp_path / "big", hidden_size=1024, intermediate_size=2048, num_hidden_layers=8)
    tiny = _random_llama(tmp_path / "tiny", hidden_size=64, intermediate_size=128, num_hidden_layers=2)
    full_mb = (big / "model.safetensors").stat().st_size / 2**20
    monkeypatch.setenv("MALLOC_MMAP_THRESHOLD_", str(1 << 20))
    monkeypatch.setenv("MALLOC_TRIM_THRESHOLD_", str(1 << 20))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.start_processes(_rank, args=(port, str(big), str(tiny), str(tmp_path)), nprocs=WORLD, start_method="spawn")
    results = [json.loads((tmp_path / f"rank-{r}.json").read_text()) for r in range(WORLD)]
    for r in results:
        print(
            f"ZeRO-3 load, rank {r['rank']} of {WORLD}: peak {r['loadPeakMB']} MB, holds {r['heldMB']} MB of "
            f"parameters; the full model is {full_mb:.1f} MB ({r['loadPeakMB'] / full_mb:.2f}x)"
        )
    for r in results:
        assert r["heldMB"] == pytest.approx(full_mb / WORLD, rel=0.02)  # each rank holds its partition only
        assert r["loadPeakMB"] < 0.8 * full_mb, r  # the whole model never lands on one rank while loading
    zero, one = results
    assert zero["gatheredHere"] and not one["gatheredHere"]  # the export gathers onto rank 0 only
    assert zero["missing"] == [] and zero["different"] == [] and zero["dtypes"] == ["torch.float32"]
