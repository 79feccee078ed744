"""The vLLM OpenAI server as a local process on 127.0.0.1, from the serving virtualenv (tests, `kubetune run`).

The server's arguments and CPU environment come from :mod:`kubetune.vllm`, the same ones the operator's
Deployment uses; what was measured about the CPU build is written there.
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
from typing import Any, cast

from kubetune.vllm import (
    DEFAULT_PORT,
    HEALTH_PATH,
    MODELS_PATH,
    SERVING_VENV_STAMP,
    VLLM_SERVER_MODULE,
    cpu_servable_problems,
    vllm_args,
    vllm_cpu_env,
)

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
        chat_template: str | None = None,
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
        self.chat_template = chat_template  # a file path or inline Jinja (--chat-template), as in the Deployment
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
        self._proc: Any = None  # kubetune_cli.localenv.processes.ManagedProcess
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
            chat_template=self.chat_template,
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
        from kubetune_cli.localenv.processes import ManagedProcess, free_ports

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
        from kubetune_cli.localenv.processes import tail

        return tail(self.log_path, lines)

    def stop(self) -> None:
        """SIGTERM the process group (API server, engine core, worker), SIGKILL leftovers. Idempotent."""
        proc, self._proc = self._proc, None
        if proc is not None:
            proc.stop(grace=self.stop_grace)


def _http_status(url: str, timeout: float = 5.0) -> int | None:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as r:
            return cast(int, r.status)
    except urllib.error.HTTPError as e:
        return e.code
    except OSError:
        return None


__all__ = [
    "LocalVLLMServer",
    "VLLMServerError",
    "local_vllm_env",
    "serving_venv_dir",
    "serving_venv_python",
]
