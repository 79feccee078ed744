"""The background checkpoint uploader against a real SeaweedFS: `_COMPLETE` only after every rank's files, at
most one upload in flight per rank, an upload failure raised in the training thread, and the debris of a dead
attempt removed before saving. Two ranks are two `Uploads` in one process (they coordinate through S3 only)."""

from __future__ import annotations

import threading
from pathlib import Path
from typing import Any

import pytest

from kubetune.api import TrainerConfig

BUCKET = "kubetune-test"
pytestmark = pytest.mark.integration


def _cfg(name: str) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "job": {"name": name, "namespace": "ns", "uid": f"uid-{name}"},
            "spec": {
                "model": {"uri": f"s3://{BUCKET}/m"},
                "dataset": {"train": f"s3://{BUCKET}/d", "format": "completion"},
                "output": {"uri": f"s3://{BUCKET}/runs"},
                "deploy": {"enabled": False},
                "resources": {"workers": 2},
            },
            "runUri": f"s3://{BUCKET}/runs/ns/{name}",
        }
    )


def _local(tmp: Path, step: int, rank: int) -> Path:
    """A rank's locally written checkpoint files (what checkpoint.write_local leaves)."""
    folder = tmp / f"checkpoint-{step:08d}-rank-{rank}"
    (folder / "ds").mkdir(parents=True)
    (folder / "ds" / f"zero_pp_rank_{rank}_optim_states.pt").write_bytes(bytes(1000 + rank))
    (folder / "rng").mkdir()
    (folder / "rng" / f"rank-{rank:05d}.pt").write_bytes(b"rng")
    return folder


def _marker(cfg: TrainerConfig, step: int) -> dict[str, Any]:
    return {"step": step, "evalLoss": None, "time": "t", "worldSize": 2, "jobUid": cfg.job.uid}


def _rels(client: Any, uri: str) -> set[str]:
    from kubetune_trainer import storage

    return {o["rel"] for o in storage.list_keys(client, uri)}


def _wait_until(what: str, check: Any) -> None:
    import time

    deadline = time.monotonic() + 60
    while not check():
        assert time.monotonic() < deadline, f"gave up waiting for {what}"
        time.sleep(0.05)


def test_complete_marker_last_and_one_upload_in_flight(s3_server: Any, tmp_path: Path) -> None:
    from kubetune_trainer import checkpoint
    from kubetune_trainer.checkpoint_upload import UPLOADED, Uploads

    client, cfg = s3_server.client(), _cfg("uploads")
    completed: list[tuple[str, int]] = []
    rank0 = Uploads(client, rank=0, world=2, token="tok", on_complete=lambda uri, m: completed.append((uri, m["step"])))
    rank1 = Uploads(client, rank=1, world=2, token="tok")
    uri1, uri2 = checkpoint.checkpoint_uri(cfg, 1), checkpoint.checkpoint_uri(cfg, 2)

    # Rank 0's files are up, rank 1 has not started: the checkpoint exists but is not complete.
    local0 = _local(tmp_path, 1, 0)
    rank0.submit(local0, uri1, _marker(cfg, 1))
    _wait_until("rank 0's marker", lambda: f"{UPLOADED}/tok/rank-00000" in _rels(client, uri1))
    assert checkpoint.COMPLETE not in _rels(client, uri1)
    assert checkpoint.find_latest(client, cfg) is None and completed == []

    # Rank 0's next checkpoint waits for the previous one to be complete (at most one upload in flight).
    after_second_submit: list[Any] = []

    def second() -> None:
        rank0.submit(_local(tmp_path, 2, 0), uri2, _marker(cfg, 2))
        after_second_submit.append((checkpoint.find_latest(client, cfg), local0.exists()))

    waiter = threading.Thread(target=second)
    waiter.start()
    rank1.submit(_local(tmp_path, 1, 1), uri1, _marker(cfg, 1))
    rank1.wait()
    waiter.join(120)
    assert after_second_submit == [(uri1, False)]  # step 1 complete and its local files gone before step 2 began
    rank1.submit(_local(tmp_path, 2, 1), uri2, _marker(cfg, 2))
    rank1.wait()
    rank0.wait()
    assert completed == [(uri1, 1), (uri2, 2)]
    assert checkpoint.find_latest(client, cfg) == uri2
    assert {"ds/zero_pp_rank_0_optim_states.pt", "ds/zero_pp_rank_1_optim_states.pt", "rng/rank-00001.pt"} <= _rels(
        client, uri2
    )
    assert not list(tmp_path.iterdir())  # every local folder deleted once uploaded


def test_upload_failure_surfaces_in_the_training_thread(s3_server: Any, tmp_path: Path) -> None:
    import boto3

    from kubetune_trainer import checkpoint
    from kubetune_trainer.checkpoint_upload import Uploads

    cfg = _cfg("failing")
    # Credentials the server rejects: a permanent error, raised without the outage retries.
    refused = boto3.client(
        "s3",
        endpoint_url=s3_server.endpoint_url,
        aws_access_key_id="wrong",
        aws_secret_access_key="wrong-secret",
        region_name="us-east-1",
    )
    rank0 = Uploads(refused, rank=0, world=1, token="tok")
    rank0.submit(_local(tmp_path, 1, 0), checkpoint.checkpoint_uri(cfg, 1), _marker(cfg, 1))
    with pytest.raises(Exception, match="InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch|403"):
        rank0.submit(_local(tmp_path, 2, 0), checkpoint.checkpoint_uri(cfg, 2), _marker(cfg, 2))  # next checkpoint
    assert not (tmp_path / "checkpoint-00000001-rank-0").exists()  # the failed upload's local files are gone
    rank0.submit(tmp_path / "checkpoint-00000002-rank-0", checkpoint.checkpoint_uri(cfg, 2), _marker(cfg, 2))
    with pytest.raises(Exception, match="InvalidAccessKeyId|AccessDenied|SignatureDoesNotMatch|403"):
        rank0.wait()  # the end of training (drain) raises it too
    assert checkpoint.find_latest(s3_server.client(), cfg) is None


def test_debris_newer_than_the_resumed_checkpoint_is_removed(s3_server: Any) -> None:
    from kubetune_trainer import checkpoint, storage

    client, cfg = s3_server.client(), _cfg("debris")
    for step, complete in ((2, True), (4, True), (6, False)):
        uri = checkpoint.checkpoint_uri(cfg, step)
        storage.put_json(client, f"{uri}/trainer_state.json", {"step": step})
        storage.put_json(client, f"{uri}/_uploaded/old/rank-00001", {"rank": 1})  # a dead attempt's marker
        if complete:
            storage.put_json(client, f"{uri}/{checkpoint.COMPLETE}", _marker(cfg, step))
    latest = checkpoint.find_latest(client, cfg)
    assert latest == checkpoint.checkpoint_uri(cfg, 4)
    assert checkpoint.discard_after(client, cfg, latest) == [6]
    assert {o["rel"].split("/")[0] for o in storage.list_keys(client, cfg.checkpoints_uri)} == {
        "step-00000002",
        "step-00000004",
    }
    assert checkpoint.discard_after(client, cfg, None) == [2, 4]  # a fresh start keeps nothing
    assert storage.list_keys(client, cfg.checkpoints_uri) == []
