"""An hf:// base with spec.model.tokenSecretRef: the trainer's loading code hands the token (HF_TOKEN, which the
operator sets from the Secret by reference) and the pinned revision to from_pretrained; nothing else gets it.
Loading through the real code from a hub-cache layout is tests/trainer/test_hf_hub_cache.py."""

from __future__ import annotations

import pytest

from kubetune.api import parse_spec
from kubetune_trainer import model as model_lib

pytestmark = pytest.mark.unit


def _spec(model: dict) -> object:
    return parse_spec(
        {
            "model": model,
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "completion"},
            "output": {"uri": "s3://bucket/o"},
        }
    )


def test_token_and_revision_go_to_from_pretrained(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_TOKEN", "hf_test_value")
    gated = _spec({"uri": "hf://org/gated", "revision": "v1.0", "tokenSecretRef": {"name": "hf"}})
    assert model_lib._source_kwargs(gated) == {"revision": "v1.0", "token": "hf_test_value"}
    # Without tokenSecretRef the job asked for no token: none is passed (public models).
    assert model_lib._source_kwargs(_spec({"uri": "hf://org/public"})) == {}
    # An s3:// base never takes hub arguments (the API refuses tokenSecretRef there).
    assert model_lib._source_kwargs(_spec({"uri": "s3://bucket/base", "revision": "x"})) == {}
    monkeypatch.delenv("HF_TOKEN")
    assert model_lib._source_kwargs(gated) == {"revision": "v1.0"}  # not set: huggingface_hub's own lookup
