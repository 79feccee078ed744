"""Fixtures for the tuning and evaluation tests: the trainer tests' tiny Llama in S3 and a 2-CPU Ray cluster.

The helpers are the trainer tests' (`tests/trainer/trainer_helpers.py`, `helpers_k8s.py`): the trainer runs
as the RayJob entrypoint does, `python -m kubetune_trainer --config FILE`, joining a `ray start --head`
cluster that plays KubeRay's. Sizing for 2 shared cores: trials x workers x CPU-per-worker must fit the
cluster's 2 CPUs, so tuning tests use 1 worker with 1 CPU per trial and 2 trials at a time (Tune's trial
actors ask for no CPU: they only drive their Ray Train run).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest

from tests.support.trainer import BUCKET, TrainerEnv, process_env


@pytest.fixture(scope="session")
def tuning_env(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerEnv]:
    """The tiny random Llama (hidden 64, 2 layers, SmolLM2 tokenizer) in S3 and a 2-CPU Ray cluster."""
    import os

    from kubetune_cli.localenv.models import tiny_llama, upload_dir
    from kubetune_cli.localenv.raycluster import LocalRayCluster

    workdir = tmp_path_factory.mktemp("tuning")
    local = tiny_llama(workdir / "tiny-llama", hidden=64, layers=2, seed=0)
    client = s3_server.client()
    model_uri = f"s3://{BUCKET}/models/tuning-tiny-llama"
    upload_dir(client, local, model_uri)
    cluster_env = {**os.environ, **process_env(s3_server, workdir)}
    cluster_env.pop("KUBECONFIG", None)
    with LocalRayCluster(workdir / "ray-head.log", num_cpus=2, env=cluster_env) as cluster:
        yield TrainerEnv(s3=s3_server, client=client, model_uri=model_uri, workdir=workdir, ray_cluster=cluster)
