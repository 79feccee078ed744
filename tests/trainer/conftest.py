"""Fixtures for the trainer tests (helpers live in trainer_helpers.py)."""

from __future__ import annotations

from typing import Any

import pytest

from trainer_helpers import BUCKET, TrainerEnv


@pytest.fixture(scope="session")
def trainer_env(s3_server: Any, tmp_path_factory: pytest.TempPathFactory) -> TrainerEnv:
    """The tiny random Llama (hidden 64, 2 layers, SmolLM2 tokenizer) uploaded to S3, and a work folder."""
    from kubetune.localenv.models import tiny_llama, upload_dir

    workdir = tmp_path_factory.mktemp("trainer")
    local = tiny_llama(workdir / "tiny-llama", hidden=64, layers=2, seed=0)
    client = s3_server.client()
    model_uri = f"s3://{BUCKET}/models/tiny-llama"
    upload_dir(client, local, model_uri)
    return TrainerEnv(s3=s3_server, client=client, model_uri=model_uri, workdir=workdir)
