"""A base model from hf://org/name at a pinned revision, through the trainer's real loading code, from a folder
laid out the way the Hugging Face hub cache lays it out (models--org--name/snapshots/<rev>/, refs/main): no hub
is reachable here, and offline mode makes transformers resolve from that cache exactly as a pod with a
pre-populated cache (or after its first download) does."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = [pytest.mark.integration, pytest.mark.timeout(300)]

REV_MAIN = "a" * 40
REV_PINNED = "b" * 40

# Runs in a fresh interpreter: huggingface_hub reads HF_HUB_CACHE and the offline flag once, at import.
LOAD = """
import json, sys
from kubetune.api import parse_spec
from kubetune_trainer import model as model_lib
spec = parse_spec(json.loads(sys.argv[1]))
source = model_lib.fetch_base(spec, client=None)
tok = model_lib.load_tokenizer(spec, source)
m = model_lib.load_base(spec, source, dtype=None)
print(json.dumps({"source": str(source), "seed_weight": float(m.model.embed_tokens.weight[0, 0]),
                  "vocab": len(tok)}))
"""


def _snapshot(cache: Path, rev: str, src: Path) -> None:
    snap = cache / "models--kubetune-test--tiny-llama" / "snapshots" / rev
    shutil.copytree(src, snap)


def test_hf_uri_with_pinned_revision_loads_from_the_hub_cache_layout(tmp_path: Path) -> None:
    from kubetune_cli.localenv.models import tiny_llama

    cache = tmp_path / "hub"
    main = tiny_llama(tmp_path / "main", hidden=64, layers=1, seed=1)
    pinned = tiny_llama(tmp_path / "pinned", hidden=64, layers=1, seed=2)
    _snapshot(cache, REV_MAIN, main)
    _snapshot(cache, REV_PINNED, pinned)
    refs = cache / "models--kubetune-test--tiny-llama" / "refs"
    refs.mkdir()
    (refs / "main").write_text(REV_MAIN)

    from safetensors.torch import load_file

    expected = {
        rev: float(load_file(d / "model.safetensors")["model.embed_tokens.weight"][0, 0])
        for rev, d in ((REV_MAIN, main), (REV_PINNED, pinned))
    }
    assert expected[REV_MAIN] != expected[REV_PINNED]
    # HF_TOKEN as the operator sets it from spec.model.tokenSecretRef: the pinned load passes it on (a gated model).
    env = {
        **os.environ,
        "HF_HUB_CACHE": str(cache),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "HF_TOKEN": "hf_kubetune_test_token",
    }

    def load(revision: str | None) -> dict:
        token = {"tokenSecretRef": {"name": "hf-token"}} if revision == REV_PINNED else {}
        spec = {
            "model": {"uri": "hf://kubetune-test/tiny-llama", **({"revision": revision} if revision else {}), **token},
            "dataset": {"train": "s3://bucket/d.jsonl", "format": "completion"},
            "output": {"uri": "s3://bucket/out"},
        }
        out = subprocess.run(
            [sys.executable, "-c", LOAD, json.dumps(spec)], env=env, capture_output=True, text=True, timeout=240
        )
        assert out.returncode == 0 or revision == "c" * 40, out.stderr[-3000:]
        return json.loads(out.stdout.strip().splitlines()[-1]) if out.returncode == 0 else {"error": out.stderr}

    pinned_run = load(REV_PINNED)
    assert pinned_run["source"] == "kubetune-test/tiny-llama"  # a repo id: transformers resolves it
    assert pinned_run["seed_weight"] == pytest.approx(expected[REV_PINNED])
    assert pinned_run["vocab"] > 1000
    assert load(None)["seed_weight"] == pytest.approx(expected[REV_MAIN])  # refs/main
    missing = load("c" * 40)  # a revision the cache does not hold: refused, naming neither a download nor a hang
    assert "error" in missing and ("c" * 40 in missing["error"] or "offline" in missing["error"].lower())
