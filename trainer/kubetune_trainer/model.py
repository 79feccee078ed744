"""The base model: fetched from S3 once per node, loaded (safetensors or GGUF), wrapped for the task and method.

Why a node-local cache with a lock: several Ray Train workers share a node (8 GPUs, 8 workers), and each
downloading a 15 GB checkpoint would multiply the traffic and the time by eight. The first worker on a node
takes an exclusive file lock and downloads; the others block on the lock and then find the completion
marker. The marker records the ETags of what was downloaded, so a base model rewritten at the same URI is
fetched again instead of being served stale from a long-lived cache.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from kubetune import chat_templates
from kubetune.api import FineTuneJobSpec
from kubetune.filelock import file_lock
from kubetune_trainer import storage
from kubetune_trainer.data.s3 import retrying

log = logging.getLogger(__name__)

DEFAULT_CACHE_DIR = "/tmp/kubetune-models"
_MARKER = ".kubetune-complete"
# Enough to build the tokenizer (and read the config) without the weights, for the data preparation step.
TOKENIZER_FILES = frozenset(
    {
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "added_tokens.json",
        "vocab.json",
        "merges.txt",
        "tokenizer.model",
        "chat_template.jinja",
        "chat_template.json",
        "config.json",
        "generation_config.json",
    }
)


def cache_dir() -> Path:
    """The node-local model cache: $KUBETUNE_MODEL_CACHE, else /tmp/kubetune-models."""
    return Path(os.environ.get("KUBETUNE_MODEL_CACHE") or DEFAULT_CACHE_DIR)


def fetch(
    client: Any, uri: str, root: Path, *, endpoint: str | None = None, only: frozenset[str] | None = None
) -> Path:
    """Download the s3:// prefix `uri` into `root` once per node; returns the local folder.

    `only` limits the download to those file names (the tokenizer for data preparation); a later full
    fetch completes the same folder. Safe to call from many processes at once.
    """
    if not uri.startswith("s3://"):
        raise ValueError(f"only s3:// model URIs can be fetched on this cluster, not {uri!r}")
    digest = hashlib.sha256(f"{endpoint or ''}|{uri}".encode()).hexdigest()[:16]
    name = re.sub(r"[^A-Za-z0-9.-]+", "-", uri.rstrip("/").rsplit("/", 1)[-1])[:40]
    folder = root / f"{name}-{digest}"
    want: Callable[[str], bool] = (lambda rel: rel in only) if only is not None else (lambda rel: True)

    listing = {o["rel"]: o["etag"] for o in storage.list_keys(client, uri) if want(o["rel"])}
    if not listing:
        raise FileNotFoundError(f"no model files under {uri}")

    def complete() -> bool:
        try:
            done = json.loads((folder / _MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError):
            return False
        return all(done.get(rel) == etag for rel, etag in listing.items())

    if complete():
        log.info("model %s: node cache hit (%s)", uri, folder)
        return folder
    with file_lock(root / f".{folder.name}.lock"):
        if complete():  # another worker on this node downloaded it while we waited for the lock
            log.info("model %s: downloaded by another worker on this node", uri)
            return folder
        t0 = time.monotonic()
        try:
            done = json.loads((folder / _MARKER).read_text())["files"]
        except (OSError, ValueError, KeyError):
            done = {}
        stale = {rel for rel, etag in listing.items() if done.get(rel) != etag}
        nbytes = storage.download(client, uri, folder, want=lambda rel: rel in stale)
        done.update(listing)
        tmp = folder / f"{_MARKER}.tmp"
        tmp.write_text(json.dumps({"uri": uri, "files": done, "pid": os.getpid()}))
        os.replace(tmp, folder / _MARKER)
        log.info(
            "model %s: downloaded %d files, %.1f MB in %.1fs into %s",
            uri,
            len(stale),
            nbytes / 1e6,
            time.monotonic() - t0,
            folder,
        )
    return folder


def fetch_base(
    spec: FineTuneJobSpec, client: Any, root: Path | None = None, *, tokenizer_only: bool = False
) -> Path | str:
    """The base model of `spec` in the node cache (only the tokenizer's files when `tokenizer_only`).

    For hf://org/name the Hugging Face repo id is returned instead: transformers downloads it into the HF
    cache, whose own file locks let the workers of a node share one download.
    """
    if spec.model.uri.startswith("hf://"):
        return spec.model.uri[len("hf://") :]
    only = None
    if tokenizer_only:
        # A GGUF file carries its tokenizer inside, so for GGUF bases the file itself is needed.
        only = TOKENIZER_FILES | {spec.model.gguf_file} if spec.model.gguf_file else TOKENIZER_FILES
    # Waits out an S3 outage (kubetune_trainer.data.s3.retrying) instead of failing the run at start-up.
    return retrying(
        f"fetching {spec.model.uri}",
        lambda: fetch(client, spec.model.uri, root or cache_dir(), endpoint=spec.dataset.endpoint, only=only),
    )


def _source_kwargs(spec: FineTuneJobSpec) -> dict[str, Any]:
    """from_pretrained's source arguments: the GGUF file; for hf:// the revision and, with tokenSecretRef, the
    token (HF_TOKEN, which the operator sets from that Secret by reference)."""
    kwargs: dict[str, Any] = {}
    if spec.model.gguf_file:
        kwargs["gguf_file"] = spec.model.gguf_file
    if spec.model.uri.startswith("hf://"):
        if spec.model.revision:
            kwargs["revision"] = spec.model.revision
        if spec.model.token_secret_ref is not None and os.environ.get("HF_TOKEN"):
            kwargs["token"] = os.environ["HF_TOKEN"]
    return kwargs


def load_tokenizer(spec: FineTuneJobSpec, model_dir: Path | str) -> Any:
    """The base model's tokenizer, with a pad token (eos when the tokenizer has none)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_dir, **_source_kwargs(spec))
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    if spec.dataset.chat_template:
        # Rendering in training, evaluation and the exported tokenizer (chat_template.jinja) all follow it.
        tokenizer.chat_template = chat_templates.resolve(spec.dataset.chat_template)
    return tokenizer


def torch_dtype(spec: FineTuneJobSpec, precision: str) -> Any:
    """dtype to load weights in: spec.model.dtype, where auto follows the training precision."""
    import torch

    name: str = spec.model.dtype
    if name == "auto":
        name = {"bf16": "bfloat16", "fp16": "float16", "fp32": "float32"}[precision]
    return getattr(torch, name)


# The transformers-side DeepSpeed config of this process. transformers holds it only through a weak
# reference, and while it is alive with ZeRO-3, from_pretrained builds the model inside deepspeed.zero.Init
# (each parameter partitioned across the ranks the moment it is created, then filled from the checkpoint one
# gathered parameter at a time), so no rank ever holds the whole model. Kept for the life of the process:
# transformers consults it again later (generation, resizing, saving).
_HF_DEEPSPEED_CONFIG: Any = None


def partition_on_load(ds_config: dict[str, Any] | None) -> bool:
    """Make the next from_pretrained load ZeRO-3 partitioned (when `ds_config` is ZeRO-3); True if so.

    Must run after the process group exists (deepspeed.init_distributed) and before from_pretrained.
    """
    global _HF_DEEPSPEED_CONFIG
    if not ds_config or ds_config.get("zero_optimization", {}).get("stage") != 3:
        return False
    from transformers.integrations.deepspeed import HfDeepSpeedConfig

    # registers itself with transformers (weakly)
    _HF_DEEPSPEED_CONFIG = HfDeepSpeedConfig(ds_config)  # type: ignore[no-untyped-call]  # transformers leaves it unannotated
    return True


def attention_implementation(requested: str, use_gpu: bool) -> str:
    """transformers' attn_implementation for training.attention (auto: flash-attention 2 where it can run)."""
    import importlib.util

    installed = importlib.util.find_spec("flash_attn") is not None
    if requested == "auto":
        return "flash_attention_2" if use_gpu and installed else "sdpa"
    if requested == "flash_attention_2" and not (use_gpu and installed):
        raise ValueError(
            "training.attention flash_attention_2 needs GPUs and the flash-attn package "
            f"({'not installed' if not installed else 'no GPU here'}); use auto or sdpa"
        )
    return requested


def load_base(spec: FineTuneJobSpec, model_dir: Path | str, dtype: Any, attention: str | None = None) -> Any:
    """The base model with the task's head (a new, randomly initialised classifier for classification).

    Partitioned across the ranks as it loads when partition_on_load() was called with a ZeRO-3 config."""
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    kwargs: dict[str, Any] = {"dtype": dtype, **_source_kwargs(spec)}
    if attention:
        kwargs["attn_implementation"] = attention
    if spec.model.task == "sequence-classification":
        model = AutoModelForSequenceClassification.from_pretrained(
            model_dir, num_labels=spec.model.num_labels, **kwargs
        )
    else:
        model = AutoModelForCausalLM.from_pretrained(model_dir, **kwargs)
    strip_quantization(model)
    return model


def load_model(
    spec: FineTuneJobSpec,
    model_dir: Path | str,
    *,
    precision: str,
    pad_token_id: int | None,
    ds_config: dict[str, Any] | None = None,
    use_gpu: bool = False,
) -> Any:
    """The trainable model: base (+ classification head) (+ LoRA adapters), in train mode.

    With precision fp32 the weights are upcast whatever dtype they were stored in: DeepSpeed's fp32 path
    keeps no master copy, so training bf16 weights there would lose updates to rounding. With a ZeRO-3
    `ds_config` the model is partitioned as it loads (partition_on_load) and loaded in fp32 straight away
    (a partitioned model cannot be cast afterwards). training.attention, gradientCheckpointing and
    ligerKernels apply here.
    """
    import torch

    training = spec.training
    partitioned = partition_on_load(ds_config)
    dtype = torch.float32 if partitioned and precision == "fp32" else torch_dtype(spec, precision)
    model = load_base(spec, model_dir, dtype, attention_implementation(training.attention, use_gpu))
    if training.liger_kernels:
        apply_liger(model, use_gpu)
    if pad_token_id is not None and model.config.pad_token_id is None:
        # Sequence classification finds each row's last token by the pad id; batches need one.
        model.config.pad_token_id = pad_token_id
    model.config.use_cache = False  # the KV cache only costs memory in training
    if precision == "fp32" and not partitioned:
        model = model.float()
    if training.gradient_checkpointing:
        # Non-reentrant checkpointing: gradients reach LoRA adapters without the inputs requiring grad, and
        # it works with ZeRO-3's partitioned parameters.
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})

    if spec.training.method == "lora":
        model = wrap_lora(spec, model)
    model.train()
    return model


def apply_liger(model: Any, use_gpu: bool) -> None:
    """Liger's fused Triton kernels patched into this model instance (GPUs only: Triton has no CPU backend)."""
    if not use_gpu:
        log.info("training.ligerKernels: ignored on CPU (Triton kernels need a GPU)")
        return
    try:
        from liger_kernel.transformers import _apply_liger_kernel_to_instance
    except ImportError as exc:
        raise ValueError("training.ligerKernels needs the liger-kernel package in the trainer image") from exc
    _apply_liger_kernel_to_instance(model=model)


def wrap_lora(spec: FineTuneJobSpec, model: Any) -> Any:
    """Freeze the base and add LoRA adapters (plus a trainable classification head for that task)."""
    from peft import LoraConfig, TaskType, get_peft_model

    lora = spec.training.lora_settings
    targets: Any = lora.target_modules
    if targets == ["all-linear"]:
        targets = "all-linear"
    config = LoraConfig(
        r=lora.r,
        lora_alpha=lora.alpha,
        lora_dropout=lora.dropout,
        target_modules=targets,
        task_type=TaskType.SEQ_CLS if spec.model.task == "sequence-classification" else TaskType.CAUSAL_LM,
    )
    return get_peft_model(model, config)


def strip_quantization(model: Any) -> None:
    """Forget that the weights came from a quantised GGUF file: transformers dequantised them on load, but
    the leftover quantizer and config entry make peft and save_pretrained treat the model as quantised."""
    if getattr(model, "hf_quantizer", None) is not None:
        model.hf_quantizer = None
    for attr in ("is_quantized", "quantization_method"):
        if attr in vars(model):
            delattr(model, attr)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
