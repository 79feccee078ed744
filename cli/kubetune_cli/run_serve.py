"""Serving a local run's result with vLLM's OpenAI-compatible server on 127.0.0.1 (`kubetune run`).

The same choices the cluster's inference Deployment makes, from the same fields: a LoRA adapter is served on
its base (`--enable-lora --lora-modules <name>=<adapter>`, rank bucket from the adapter's `r`) unless
`spec.deploy.mode` is `merged`; a full fine-tune is served as a model. The served name is
`spec.deploy.servedModelName`, else the job's name; with an adapter the base answers as `<name>-base` too,
which lets the run show both answers side by side. Weights are fetched from the run's S3 outputs the way the
init container fetches them (`kubetune.fetch`); the base goes to the kubetune cache, the result next to the
run's other local outputs. When the trainer reported the chat template it rendered with
(`status.model.chatTemplate`, a file next to the model), the server gets `--chat-template` on that file, as
in the cluster.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from kubetune import api
from kubetune_cli.errors import EXIT_ENVIRONMENT, CLIError

# A local run bounds the context it serves (KV cache memory on a laptop); the spec's maxModelLen wins.
LOCAL_MAX_MODEL_LEN = 2048


@dataclass
class Served:
    server: Any  # kubetune_cli.localenv.vllm_server.LocalVLLMServer
    model: str  # the fine-tuned model's name in requests
    base: str | None  # the base model's name, when served beside an adapter


def check_serving_venv() -> None:
    from kubetune_cli.localenv.vllm_server import serving_venv_dir, serving_venv_python

    if serving_venv_python() is None:
        raise CLIError(
            f"the vLLM serving environment is missing ({serving_venv_dir()}): build it with "
            "`bash tools/serving-venv.sh` (~6 minutes, once), or pass --no-serve",
            EXIT_ENVIRONMENT,
        )


def start(
    cfg: api.TrainerConfig, model: dict[str, Any], client: Any, run_dir: Path, *, port: int | None = None
) -> Served:
    from kubetune.fetch import fetch_prefix
    from kubetune.vllm import lora_rank_bucket
    from kubetune_cli.localenv.binaries import cache_dir
    from kubetune_cli.localenv.vllm_server import LocalVLLMServer

    spec = cfg.spec
    name = spec.deploy.served_model_name or cfg.job.name
    max_len = spec.deploy.max_model_len or LOCAL_MAX_MODEL_LEN
    common: dict[str, Any] = dict(max_model_len=max_len, port=port, log_path=run_dir / "vllm.log")
    kind = model.get("kind")
    if kind == "adapter" and (spec.deploy.mode or "adapter") == "adapter":
        if spec.model.gguf_file:
            raise CLIError(
                "serving an adapter on a GGUF base is not supported; export merged weights "
                "(spec.output.exportMerged) and set spec.deploy.mode: merged"
            )
        digest = hashlib.sha256(f"{spec.dataset.endpoint}|{spec.model.uri}".encode()).hexdigest()[:12]
        base_dir = cache_dir() / "served-models" / f"{spec.model.uri.rstrip('/').rsplit('/', 1)[-1]}-{digest}"
        fetch_prefix(spec.model.uri, base_dir, client=client)
        adapter_dir = run_dir / "model"
        fetch_prefix(model["uri"], adapter_dir, client=client, prune=True)
        rank = int(json.loads((adapter_dir / "adapter_config.json").read_text()).get("r", 8))
        base_name = f"{name}-base"
        server = LocalVLLMServer(
            base_dir,
            base_name,
            lora_modules={name: adapter_dir},
            max_lora_rank=lora_rank_bucket(rank),
            chat_template=_template(model, adapter_dir),
            **common,
        )
        return Served(server.start(), name, base_name)
    if kind == "adapter":  # merged
        uri = model.get("mergedUri")
        if not uri:
            raise CLIError(
                "spec.deploy.mode is merged but no merged weights were exported: set spec.output.exportMerged: true"
            )
    else:
        uri = model["uri"]
    model_dir = run_dir / "model"
    fetch_prefix(uri, model_dir, client=client, prune=True)
    template = _template(model, model_dir) if uri == model.get("uri") else None
    return Served(LocalVLLMServer(model_dir, name, chat_template=template, **common).start(), name, None)


def _template(model: dict[str, Any], model_dir: Path) -> str | None:
    """The trainer's chat template file in the fetched model folder (status.model.chatTemplate), if any."""
    name = model.get("chatTemplate")
    if not name or Path(name).name != name:
        return None
    path = model_dir / name
    # Absolute: vLLM runs in the run folder (its log's), where a path relative to ours names nothing.
    return str(path.resolve()) if path.is_file() else None
