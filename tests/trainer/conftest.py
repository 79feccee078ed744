"""Fixtures for the trainer tests (helpers live in trainer_helpers.py)."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import pytest
from trainer_helpers import BUCKET, TrainerEnv, process_env


@pytest.fixture(scope="session")
def trainer_env(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[TrainerEnv]:
    """The tiny random Llama (hidden 64, 2 layers, SmolLM2 tokenizer) in S3, a work folder, and a Ray cluster
    with 2 CPUs (two 1-CPU training workers) shared by the session's trainer runs, as KubeRay's would be."""
    import os

    from kubetune_cli.localenv.models import tiny_llama, upload_dir
    from kubetune_cli.localenv.raycluster import LocalRayCluster

    workdir = tmp_path_factory.mktemp("trainer")
    local = tiny_llama(workdir / "tiny-llama", hidden=64, layers=2, seed=0)
    client = s3_server.client()
    model_uri = f"s3://{BUCKET}/models/tiny-llama"
    upload_dir(client, local, model_uri)
    cluster_env = {**os.environ, **process_env(s3_server, workdir)}
    cluster_env.pop("KUBECONFIG", None)
    cluster = _start_ray(lambda: LocalRayCluster(workdir / "ray-head.log", num_cpus=2, env=cluster_env))
    try:
        yield TrainerEnv(s3=s3_server, client=client, model_uri=model_uri, workdir=workdir, ray_cluster=cluster)
    finally:
        cluster.stop()


def _start_ray(make: Any, attempts: int = 3) -> Any:
    """Start a fresh cluster object per attempt: Ray gives its raylet a fixed 30 s to register, which a
    machine loaded by parallel test runs can exceed."""
    from kubetune_cli.localenv.raycluster import RayClusterError

    for attempt in range(1, attempts + 1):
        cluster = make()
        try:
            return cluster.start()
        except RayClusterError:
            cluster.stop()
            if attempt == attempts:
                raise
    raise AssertionError("unreachable")
