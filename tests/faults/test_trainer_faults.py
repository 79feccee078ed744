"""The trainer's faults, caused for real: a Ray Train worker killed with SIGKILL, SeaweedFS stopped during a
checkpoint upload and during data streaming, a job re-created with the same name and a new spec.

Lean on purpose (CI has 2 cores): one module-wide SeaweedFS and Ray cluster, a tiny random Llama, and runs shared
between tests. The uninterrupted reference run is job `faults` incarnation A; the faulted run is the same spec as
incarnation B (a worker killed after its step-4 checkpoint, then S3 stopped for 15 s as the step-12 checkpoint is
written); the re-created job is incarnation C with another spec, started while S3 is down (its start-up requests
wait: the base model's listing and the data's). Each test records one row of the recovery table
(tests/faults/conftest.py).
"""

from __future__ import annotations

import contextlib
import os
import signal
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest

from kubetune import api

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "trainer"))
from trainer_faults_support import (
    StoppableS3,
    lineage,
    max_step,
    records_twice,
    start_driver,
    trace_rows,
    train_workers,
    wait_for,
)
from trainer_helpers import fortunes, process_env, put_jsonl

pytestmark = [pytest.mark.faults, pytest.mark.timeout(1500)]

BUCKET = "kubetune-faults"
STEPS, CKPT_EVERY, KILL_AFTER_STEP, OUTAGE_AT_STEP, OUTAGE_S = 16, 4, 6, 12, 15.0


@pytest.fixture(scope="module")
def fenv(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """The module's own SeaweedFS (stoppable), tiny model and data in it, and a 2-CPU Ray cluster."""
    from kubetune_cli.localenv.models import tiny_llama, upload_dir
    from kubetune_cli.localenv.raycluster import LocalRayCluster
    from kubetune_cli.localenv.s3_server import S3Server

    workdir = tmp_path_factory.mktemp("trainer-faults")
    server = S3Server(workdir / "s3", buckets=[BUCKET]).start()
    try:
        client = server.client()
        model_uri = f"s3://{BUCKET}/models/tiny-llama"
        upload_dir(client, tiny_llama(workdir / "tiny-llama", hidden=64, layers=2, seed=0), model_uri)
        data = put_jsonl(
            client, f"s3://{BUCKET}/data/fortunes.jsonl", [{"text": t} for t in fortunes("computers", limit=120)]
        )
        env = {**process_env(server, workdir), "KUBETUNE_S3_OUTAGE_S": "120"}
        cluster_env = {**os.environ, **env}
        cluster_env.pop("KUBECONFIG", None)
        cluster = LocalRayCluster(workdir / "ray-head.log", num_cpus=2, env=cluster_env).start()
        try:
            yield {
                "server": server,
                "s3": StoppableS3(server),
                "client": client,
                "model_uri": model_uri,
                "data": data,
                "workdir": workdir,
                "cluster": cluster,
                "env": {**env, **cluster.driver_env()},
            }
        finally:
            cluster.stop()
    finally:
        server.stop()


def _config(fenv: Any, uid: str, training: dict[str, Any] | None = None) -> dict[str, Any]:
    spec = api.parse_spec(
        {
            "model": {"uri": fenv["model_uri"]},
            "dataset": {
                "train": fenv["data"],
                "format": "completion",
                "validationSplit": 0.1,
                "endpoint": fenv["server"].endpoint_url,
                "preprocessing": {"maxSeqLength": 32},
            },
            "training": {
                "method": "lora",
                "lora": {"r": 4, "alpha": 8, "dropout": 0.1},
                "maxSteps": STEPS,
                "learningRate": 0.003,
                "perDeviceBatchSize": 2,
                "evalIntervalSteps": STEPS,
                "checkpoint": {"intervalSteps": CKPT_EVERY, "keep": 10},
                "deepspeed": {"zeroStage": 2},
                **(training or {}),
            },
            "resources": {"workers": 2, "gpusPerWorker": 0, "cpuPerWorker": "1"},
            "output": {"uri": f"s3://{BUCKET}/runs"},
            "deploy": {"enabled": False},
        }
    )
    cfg = api.resolve_trainer_config("faults", "tests", uid, spec)
    cfg.reporting.kubernetes = False
    return cfg.wire()


def _keys(client: Any, uri: str) -> dict[str, str]:
    """key -> ETag of every object under the prefix."""
    bucket, prefix = uri[len("s3://") :].split("/", 1)
    out = {}
    for page in client.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix + "/"):
        out.update({o["Key"]: o["ETag"] for o in page.get("Contents", [])})
    return out


def _metrics(client: Any, run_uri: str) -> list[dict[str, Any]]:
    import json

    bucket, key = f"{run_uri}/metrics.jsonl"[len("s3://") :].split("/", 1)
    body = client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
    return [json.loads(line) for line in body.splitlines() if line.strip()]


@pytest.fixture(scope="module")
def straight(fenv: Any) -> dict[str, Any]:
    """Incarnation A: the uninterrupted run every faulted one is compared with."""
    cfg = _config(fenv, "a-" + uuid.uuid4().hex[:8])
    driver = start_driver(cfg, fenv["workdir"], fenv["env"], "straight")
    rc = driver.wait()
    assert rc == 0, driver.output()[-5000:]
    metrics = _metrics(fenv["client"], cfg["runUri"])
    final = next(m for m in reversed(metrics) if m.get("event") == "finished")
    return {"cfg": cfg, "driver": driver, "evalLoss": final["evalLoss"], "trace": trace_rows(driver.trace_dir)}


@pytest.fixture(scope="module")
def faulted(fenv: Any, straight: dict[str, Any]) -> dict[str, Any]:
    """Incarnation B: a Ray Train worker killed with SIGKILL after the step-4 checkpoint, then SeaweedFS
    stopped for 15 s as the step-12 checkpoint is written; one trainer driver, one Ray job throughout."""
    cfg = _config(fenv, "b-" + uuid.uuid4().hex[:8])
    # Steps of at least half a second (as a bigger model's would be): the test sees step 6 and step 11 before the
    # run is past them however fast the machine trains the tiny model (CI's does ~5 steps/s).
    slow = {"KUBETUNE_STEP_DELAY_S": "0.5"}
    driver = start_driver(cfg, fenv["workdir"], {**fenv["env"], **slow}, "faulted")
    out: dict[str, Any] = {"cfg": cfg, "driver": driver}
    try:
        # Checkpoints upload in the background: the kill comes once the step-4 one is complete in S3 (a kill
        # while its upload still runs would rightly resume from step 0, which is not what this test shows).
        first_ckpt = f"step-{CKPT_EVERY:08d}/_COMPLETE"
        runs_ckpts = f"{cfg['runUri']}/checkpoints"
        wait_for(
            first_ckpt, lambda: any(k.endswith(first_ckpt) for k in _keys(fenv["client"], runs_ckpts)), 400, driver
        )
        wait_for(f"step {KILL_AFTER_STEP}", lambda: max_step(driver.trace_dir) >= KILL_AFTER_STEP, 400, driver)
        workers = train_workers(fenv["cluster"].pid)
        assert len(workers) == 2, [w.cmdline() for w in workers]
        victim = workers[-1]
        out["killed_at_step"] = max_step(driver.trace_dir)
        before = sum(len(r) for r in trace_rows(driver.trace_dir).values())
        os.kill(victim.pid, signal.SIGKILL)
        t_kill = time.monotonic()
        # Recovered: the restarted worker group trains again (a trace row after the rollback).
        wait_for("the restarted workers' first step", lambda: _rolled_back(driver.trace_dir, before), 400, driver)
        out["recover_s"] = time.monotonic() - t_kill

        # Down one step before the checkpoint step: the step-12 checkpoint is then written into the outage for
        # sure (a tiny model's checkpoint uploads in well under a second, so stopping after step 12 was traced
        # could land after the upload had already finished).
        before_ckpt = OUTAGE_AT_STEP - 1
        wait_for(f"step {before_ckpt}", lambda: _lineage_step(driver.trace_dir) >= before_ckpt, 400, driver)
        t_down = fenv["s3"].stop()
        time.sleep(OUTAGE_S)
        t_up = fenv["s3"].start()
        out["outage_s"] = t_up - t_down
        out["rc"] = driver.wait()
    finally:
        if driver.proc.poll() is None:
            driver.proc.kill()
        if fenv["server"]._proc is None or not fenv["server"]._proc.alive():
            fenv["s3"].start()
    out["trace"] = trace_rows(driver.trace_dir)
    return out


def _rolled_back(trace_dir: Path, rows_before: int) -> bool:
    rows = trace_rows(trace_dir)
    return any(lineage(r)[1] > 0 for r in rows.values()) and sum(len(r) for r in rows.values()) > rows_before


def _lineage_step(trace_dir: Path) -> int:
    rows = trace_rows(trace_dir)
    return min((lineage(r)[0][-1]["step"] for r in rows.values() if r), default=0) if len(rows) == 2 else 0


def test_worker_killed_recovers_in_the_same_attempt(
    fenv: Any, straight: dict[str, Any], faulted: dict[str, Any], fault_row: Any
) -> None:
    """kill -9 of a Ray Train worker: Ray Train restarts the worker group in the same Ray job, which resumes
    from the newest complete checkpoint; no record counts twice, the result matches the uninterrupted run."""
    driver, cfg = faulted["driver"], faulted["cfg"]
    assert faulted["rc"] == 0, driver.output()[-6000:]
    assert driver.final_line().startswith(f"kubetune-trainer: succeeded: step {STEPS}/{STEPS}"), driver.final_line()
    metrics = _metrics(fenv["client"], cfg["runUri"])
    restarts = [m for m in metrics if m.get("event") == "restart"]
    assert [r["cause"] for r in restarts] == ["WorkerFailed"], restarts
    resumed_step = restarts[0]["resumedStep"]
    assert resumed_step % CKPT_EVERY == 0 and 0 < resumed_step <= faulted["killed_at_step"]
    assert restarts[0]["resumedFrom"] == f"{cfg['runUri']}/checkpoints/step-{resumed_step:08d}"

    redone_total, twice_total = 0, 0
    for rank, rows in faulted["trace"].items():
        kept, redone = lineage(rows)
        assert [r["step"] for r in kept] == [r["step"] for r in straight["trace"][rank]], rank
        # Deterministic data order: the lineage trained exactly the uninterrupted run's records.
        assert [r["rows"] for r in kept] == [r["rows"] for r in straight["trace"][rank]], rank
        redone_total = max(redone_total, redone)
        twice_total += records_twice(kept)
    assert twice_total == 0
    assert 1 <= redone_total <= CKPT_EVERY
    final = next(m for m in reversed(metrics) if m.get("event") == "finished")
    # Within noise of the uninterrupted run (identical up to float summation order: RNG states are restored).
    assert final["evalLoss"] == pytest.approx(straight["evalLoss"], rel=0.02)
    fault_row(
        "kill -9 a Ray Train worker",
        f"completed in the same Ray job from step {resumed_step}; evalLoss "
        f"{final['evalLoss']:.4f} vs {straight['evalLoss']:.4f} uninterrupted",
        steps_redone=redone_total,
        records_twice=twice_total,
        recover_s=faulted["recover_s"],
    )


def test_s3_stopped_during_checkpoint_upload(fenv: Any, faulted: dict[str, Any], fault_row: Any) -> None:
    """SeaweedFS down for 15 s while the step-12 checkpoint is written: the upload waits and completes, training
    goes on, nothing is redone."""
    driver, cfg = faulted["driver"], faulted["cfg"]
    assert faulted["rc"] == 0, driver.output()[-6000:]
    step = f"step-{OUTAGE_AT_STEP:08d}"
    waited = [ln for ln in driver.output().splitlines() if "trying again" in ln]
    assert any(f"checkpoints/{step}/" in ln for ln in waited), waited  # the upload itself met the outage
    keys = _keys(fenv["client"], f"{cfg['runUri']}/checkpoints")
    assert any(k.endswith(f"{step}/_COMPLETE") for k in keys), sorted(keys)
    restarts = [m for m in _metrics(fenv["client"], cfg["runUri"]) if m.get("event") == "restart"]
    assert len(restarts) == 1  # only the killed worker's; the outage cost no restart
    fault_row(
        "SeaweedFS stopped 15 s during a checkpoint upload",
        f"training went on; {len(waited)} S3 requests waited; {step} complete",
        steps_redone=0,
        records_twice=0,
        recover_s=faulted["outage_s"],
    )


def test_recreated_job_trains_from_zero_while_s3_stopped_at_its_start(
    fenv: Any, straight: dict[str, Any], faulted: dict[str, Any], fault_row: Any
) -> None:
    """Job `faults` deleted and re-created with a new spec (incarnation C, new uid), started while SeaweedFS is
    down: its first S3 requests (the base model's listing, then the data) wait for S3, it trains from step 0
    under its own prefix, and incarnations A and B are untouched (same objects, same ETags)."""
    client = fenv["client"]
    before = {inc: _keys(client, run["cfg"]["runUri"]) for inc, run in (("A", straight), ("B", faulted))}
    cfg = _config(
        fenv,
        "c-" + uuid.uuid4().hex[:8],
        {"maxSteps": 4, "learningRate": 0.001, "checkpoint": {"intervalSteps": 2, "keep": 1}},
    )
    t_down = fenv["s3"].stop()
    driver = start_driver(cfg, fenv["workdir"], fenv["env"], "recreated")
    try:
        wait_for("the trainer to wait for S3", lambda: "trying again" in driver.output(), 120, driver)
        # S3 has been down since before the driver started: keep it down only for the rest of OUTAGE_S.
        time.sleep(max(0.0, t_down + OUTAGE_S - time.monotonic()))
    finally:
        t_up = fenv["s3"].start()
    rc = driver.wait()
    assert rc == 0, driver.output()[-6000:]
    waited = [ln for ln in driver.output().splitlines() if "trying again" in ln]
    assert waited and t_up - t_down >= OUTAGE_S
    metrics = _metrics(client, cfg["runUri"])
    start = next(m for m in metrics if m.get("event") == "start")
    assert start["step"] == 0 and start["resumedFrom"] is None
    assert not [m for m in metrics if m.get("event") == "restart"]
    assert cfg["runUri"] not in (straight["cfg"]["runUri"], faulted["cfg"]["runUri"])
    after = {inc: _keys(client, run["cfg"]["runUri"]) for inc, run in (("A", straight), ("B", faulted))}
    assert after == before  # nothing of an earlier incarnation was written, replaced or deleted
    model = _keys(client, f"{cfg['runUri']}/model")
    assert any(k.endswith("adapter_model.safetensors") for k in model)
    fault_row(
        "delete + re-create (same name, new spec), S3 stopped 15 s+ at its start",
        f"trained from step 0 under its own prefix; {len(waited)} S3 requests waited; earlier runs untouched "
        f"({sum(len(v) for v in before.values())} objects)",
        steps_redone=0,
        records_twice=0,
        recover_s=t_up - t_down,
    )


def test_drained_node_checkpoints_just_in_time(fenv: Any, fault_row: Any) -> None:
    """`ray drain-node` (preemption, 10 s deadline) on the node of a running training: Ray Train's preemption
    notice makes every rank write a just-in-time checkpoint; at the deadline the node is reclaimed (the test
    plays the cloud provider and stops the Ray cluster, as `ray drain-node` leaves that to its caller); the job's
    retry (KubeRay's backoffLimit: a new driver on another cluster, here the module's) resumes from that
    checkpoint."""
    import json
    import subprocess

    from kubetune_cli.localenv.raycluster import LocalRayCluster, ray_executable

    workdir = fenv["workdir"]
    # The notice arrives ~5-20 s after the drain (a `ray drain-node` CLI start, then a sync interval), and CI's
    # machine trains this model at ~5 steps/s: the first attempt's steps take 1 s more each (as a bigger model's
    # would), so the notice lands mid-run on any machine; the retry trains at full speed. No interval checkpoints.
    cfg = _config(
        fenv,
        "p-" + uuid.uuid4().hex[:8],
        {"maxSteps": 60, "evalIntervalSteps": 60, "checkpoint": {"intervalSteps": 1000, "keep": 2}},
    )
    cluster_env = {**os.environ, **process_env(fenv["server"], workdir)}
    cluster_env.pop("KUBECONFIG", None)
    trace = workdir / "trace-drained"
    first = LocalRayCluster(workdir / "ray-drained-1.log", num_cpus=2, env=cluster_env).start()
    drained_address = first.address
    try:
        slow = {"KUBETUNE_STEP_DELAY_S": "1"}
        driver = start_driver(cfg, workdir, {**fenv["env"], **first.driver_env(), **slow}, "drained-1", trace)
        wait_for("step 3", lambda: max_step(trace) >= 3, 400, driver)
        drain = subprocess.run(
            [
                str(ray_executable()),
                "drain-node",
                f"--address={first.address}",
                "--reason=DRAIN_NODE_REASON_PREEMPTION",
                "--reason-message=spot reclaim (faults test)",
                "--deadline-remaining-seconds=10",
            ],
            env={**cluster_env, **first.driver_env()},
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert drain.returncode == 0, drain.stdout + drain.stderr
        t_drain = time.monotonic()
        marker = f"{cfg['runUri']}/restarts.json"
        bucket, key = marker[len("s3://") :].split("/", 1)

        def preempted() -> bool:
            try:
                return json.loads(fenv["client"].get_object(Bucket=bucket, Key=key)["Body"].read())["preempted"]
            except Exception:  # noqa: BLE001 - not written yet
                return False

        wait_for("the just-in-time checkpoint", preempted, 120, driver)
        trained_before = max_step(trace)
        time.sleep(max(0.0, t_drain + 10 - time.monotonic()))
    finally:
        first.stop()  # the deadline passed: the node is gone
    # A driver without its cluster goes with it, as the submitter pod would. Left alone it takes ~18 s to give up
    # on the lost cluster, and nothing here is about how it does: kill it with the node.
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(driver.proc.pid, signal.SIGKILL)
    driver.proc.wait(30)
    t_lost = time.monotonic()
    jit = [
        int(k.split("step-")[1][:8])
        for k in _keys(fenv["client"], f"{cfg['runUri']}/checkpoints")
        if k.endswith("/_COMPLETE")
    ]
    assert jit, "no complete checkpoint"
    jit_step = max(jit)

    # The retry runs on the module's cluster (idle between tests): another cluster than the drained one, which is
    # stopped, and one already started, which saves starting and stopping a third. Its Ray Train workers are
    # recorded as the retry trains, to show where it ran.
    assert fenv["cluster"].address != drained_address and not first.alive()
    rows_before = sum(len(r) for r in trace_rows(trace).values())
    retry_workers: set[int] = set()

    def retry_trained() -> bool:
        retry_workers.update(p.pid for p in train_workers(fenv["cluster"].pid))
        return sum(len(r) for r in trace_rows(trace).values()) > rows_before

    retry = start_driver(cfg, workdir, fenv["env"], "drained-2", trace)
    wait_for("the retry's first step", retry_trained, 400, retry)
    recover_s = time.monotonic() - t_lost
    rc = retry.wait()
    assert rc == 0, retry.output()[-6000:]
    assert len(retry_workers) >= 2, retry_workers  # both ranks trained as processes of the module's cluster
    metrics = _metrics(fenv["client"], cfg["runUri"])
    restarts = [m for m in metrics if m.get("event") == "restart"]
    assert [(r["cause"], r["resumedStep"]) for r in restarts] == [("NodePreempted", jit_step)], restarts
    assert jit_step < 60 and jit_step >= 3  # not an interval checkpoint: written for the notice
    redone = max(lineage(rows)[1] for rows in trace_rows(trace).values())
    twice = sum(records_twice(lineage(rows)[0]) for rows in trace_rows(trace).values())
    assert redone <= 1 and twice == 0, (redone, twice, trained_before, jit_step)
    fault_row(
        "ray drain-node (preemption, 10 s deadline)",
        f"just-in-time checkpoint at step {jit_step}; resumed on another Ray cluster",
        steps_redone=redone,
        records_twice=twice,
        recover_s=recover_s,
    )


def test_tuning_driver_killed_keeps_finished_trials(fenv: Any, fault_row: Any) -> None:
    """A tuning job's driver killed (SIGKILL) once its first trial has finished and exported: the retried driver
    (what KubeRay's backoffLimit runs) restores Tune's experiment from S3, keeps the finished trial (its model
    is not written again) and resumes the interrupted one from its checkpoint. Two trials, one at a time: a
    third would only be started afresh by the retry, as any trial of a first attempt is."""
    client = fenv["client"]
    cfg = _config(
        fenv,
        "t-" + uuid.uuid4().hex[:8],
        {"maxSteps": 6, "evalIntervalSteps": 3, "checkpoint": {"intervalSteps": 2, "keep": 1}},
    )
    cfg["spec"]["resources"]["workers"] = 1
    cfg["spec"]["tuning"] = {
        "objective": {"metric": "evalLoss", "mode": "min"},
        "algorithm": "grid",
        "trials": 2,
        "maxConcurrentTrials": 1,
        "maxStepsPerTrial": 6,
        "searchSpace": {"lora.r": {"type": "choice", "values": [2, 4]}},
    }
    run = cfg["runUri"]
    first_model = f"{run}/trials/trial-00/model"
    driver = start_driver(cfg, fenv["workdir"], fenv["env"], "tune-1")
    try:
        wait_for(
            "trial-00's model",
            lambda: any(k.endswith("adapter_model.safetensors") for k in _keys(client, first_model)),
            600,
            driver,
        )
        wait_for(
            "trial-01's first checkpoint",
            lambda: any(k.endswith("/_COMPLETE") for k in _keys(client, f"{run}/trials/trial-01/checkpoints")),
            400,
            driver,
        )
    finally:
        if driver.proc.poll() is None:
            os.killpg(driver.proc.pid, signal.SIGKILL)  # the driver, as a lost Ray head or a killed submitter
    driver.proc.wait(30)
    t_killed = time.monotonic()
    kept_model = _keys(client, first_model)

    retry = start_driver(cfg, fenv["workdir"], fenv["env"], "tune-2")
    rc = retry.wait()
    assert rc == 0, retry.output()[-6000:]
    assert "best of 2 trials" in retry.final_line(), retry.final_line()
    metrics = _metrics(client, run)
    restored = [m for m in metrics if m.get("event") == "tuningRestored"]
    assert restored and "trial-00" in restored[0]["keptTrials"], restored
    assert _keys(client, first_model) == kept_model  # the finished trial was not trained or exported again
    resumed = [m for m in _metrics(client, f"{run}/trials/trial-01") if m.get("event") == "restart"]
    assert [m["cause"] for m in resumed] == ["JobRetried"] and resumed[0]["resumedStep"] >= 2, resumed
    # Steps trial-01 trained in the killed driver's time after its checkpoint (trials ran one at a time: the
    # trace's last run of steps from 1 is trial-01's).
    rows = trace_rows(driver.trace_dir)[0]
    last_start = max(i for i, r in enumerate(rows) if r["step"] == 1)
    redone = max(0, max(r["step"] for r in rows[last_start:]) - resumed[0]["resumedStep"])
    assert any(k.endswith("adapter_model.safetensors") for k in _keys(client, f"{run}/trials/trial-01/model"))
    fault_row(
        "tuning driver killed after its first trial finished",
        f"retry restored Tune's experiment from S3: {', '.join(restored[0]['keptTrials'])} kept, trial-01 "
        f"resumed at step {resumed[0]['resumedStep']}, both trials done",
        steps_redone=redone,
        records_twice="-",
        recover_s=time.monotonic() - t_killed,
    )
