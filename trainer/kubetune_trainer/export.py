"""The final model to S3 in the Hugging Face layout vLLM loads.

- `<run_uri>/model/`: with LoRA the adapter (adapter_config.json + adapter_model.safetensors, with
  base_model_name_or_path set to the base model's URI so the artifact says what it applies to); with full
  fine-tuning the whole model (config.json + model.safetensors). The tokenizer is saved beside either.
- `<run_uri>/merged/`: with LoRA and output.exportMerged, the adapter merged into the base weights, a plain
  model that needs no LoRA support to serve.

Under ZeRO-3 every rank holds only a shard of each weight, so the weights are gathered first (a collective:
all ranks call `export`). A full model is gathered one layer at a time onto rank 0 only, in the training
dtype (DeepSpeed's `stage3_gather_16bit_weights_on_model_save` path): no other rank ever holds the whole
model. With LoRA only the adapter (the trainable weights) is gathered; the merged model is built on rank 0
from a fresh copy of the base in the node cache, not from the sharded training model.
"""

from __future__ import annotations

import copy
import logging
import shutil
from pathlib import Path
from typing import Any, cast

from kubetune import chat_templates
from kubetune.api import ModelArtifact, TrainerConfig
from kubetune_trainer import model as model_lib
from kubetune_trainer import storage

log = logging.getLogger(__name__)


def gather_state_dict(engine: Any, *, rank: int, trainable_only: bool) -> dict[str, Any] | None:
    """The model's weights as full CPU tensors on rank 0 (None on other ranks); collective under ZeRO-3."""
    import deepspeed

    module = engine.module
    if not trainable_only and engine.zero_optimization_partition_weights():
        # Layer by layer onto rank 0 (GatheredParameters with modifier_rank=0 frees each layer again).
        return cast("dict[str, Any] | None", engine._zero3_consolidated_16bit_state_dict())
    params = [p for p in module.parameters() if p.requires_grad or not trainable_only]
    # modifier_rank=None: read-only gather; for ZeRO-2 (no partitioned weights) it does nothing.
    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        if rank != 0:
            return None
        if trainable_only:
            return {n: p.detach().to("cpu", copy=True) for n, p in module.named_parameters() if p.requires_grad}
        return {n: t.detach().to("cpu", copy=True) for n, t in module.state_dict().items()}


def export(
    engine: Any,
    cfg: TrainerConfig,
    tokenizer: Any,
    *,
    rank: int,
    client: Any,
    staging: Path,
    base_dir: Path | str,
    precision: str,
) -> ModelArtifact | None:
    """Save the trained model to S3 (all ranks call; rank 0 writes). Returns the artifact on rank 0."""
    spec = cfg.spec
    lora = spec.training.method == "lora"
    module = engine.module
    state_dict = gather_state_dict(engine, rank=rank, trainable_only=lora)
    if rank != 0:
        return None

    out = staging / "export"
    shutil.rmtree(out, ignore_errors=True)
    module.config.use_cache = True  # switched off for training; serving wants the KV cache
    if lora:
        module.peft_config["default"].base_model_name_or_path = spec.model.uri
    if lora:
        # save_embedding_layers=False: peft would otherwise look up the base's config by its name (an s3://
        # URI here) to guess whether the vocabulary changed; it did not, LoRA leaves embeddings alone.
        module.save_pretrained(
            out / "model", state_dict=state_dict, safe_serialization=True, save_embedding_layers=False
        )
    else:
        module.save_pretrained(out / "model", state_dict=state_dict, safe_serialization=True)
    tokenizer.save_pretrained(out / "model")
    _replace(client, out / "model", cfg.model_uri, cfg.run_uri)
    # transformers writes the tokenizer's chat template as chat_template.jinja: the file the inference server is
    # started with (--chat-template), so serving renders prompts exactly as training did.
    template = chat_templates.EXPORT_FILE if (out / "model" / chat_templates.EXPORT_FILE).is_file() else None
    artifact = ModelArtifact(
        uri=cfg.model_uri,
        kind="adapter" if lora else "full",
        base_uri=spec.model.uri if lora else None,
        chat_template=template,
    )
    log.info("exported the %s to %s", "adapter" if lora else "model", cfg.model_uri)

    if lora and spec.output.export_merged:
        merged_uri = f"{cfg.run_uri}/merged"
        assert state_dict is not None  # rank 0 with trainable_only (lora): gather_state_dict's dict
        merged = merge_adapter(module, state_dict, cfg, base_dir, precision)
        merged.save_pretrained(out / "merged", safe_serialization=True)
        tokenizer.save_pretrained(out / "merged")
        _replace(client, out / "merged", merged_uri, cfg.run_uri)
        artifact.merged_uri = merged_uri
        log.info("exported the merged model to %s", merged_uri)
    shutil.rmtree(out, ignore_errors=True)
    return artifact


def merge_adapter(
    peft_module: Any, adapter_state: dict[str, Any], cfg: TrainerConfig, base_dir: Path | str, precision: str
) -> Any:
    """A plain transformers model: a fresh base with the trained adapter folded into its weights."""
    from peft import get_peft_model, get_peft_model_state_dict, set_peft_model_state_dict

    base = model_lib.load_base(cfg.spec, base_dir, model_lib.torch_dtype(cfg.spec, precision))
    peft_config = copy.deepcopy(peft_module.peft_config["default"])  # get_peft_model rewrites its base path
    fresh = get_peft_model(base, peft_config)
    set_peft_model_state_dict(fresh, get_peft_model_state_dict(peft_module, state_dict=adapter_state))
    merged = fresh.merge_and_unload()
    merged.config.use_cache = True  # it was switched off for training; serving wants the KV cache
    return merged


def _replace(client: Any, local: Path, uri: str, run_uri: str) -> None:
    """Upload `local` as the whole content of `uri` (files of an earlier export are removed first).

    Only ever inside this run's own prefix (one incarnation of one job): an export never deletes anything of
    another run, whatever the URIs say."""
    if not uri.startswith(run_uri.rstrip("/") + "/"):
        raise RuntimeError(f"refusing to replace {uri}: it is outside this run's prefix {run_uri}")
    storage.delete_prefix(client, uri)
    storage.upload_dir(client, local, uri)
