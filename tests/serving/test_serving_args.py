"""kubetune.vllm's pure helpers and the local server's environment: the vLLM command line and environment (no server)."""

from __future__ import annotations

import pytest

from kubetune.vllm import (
    VLLM_CPU_HEAD_SIZES,
    VLLM_LORA_RANKS,
    VLLM_SERVER_MODULE,
    cpu_servable_problems,
    lora_rank_bucket,
    vllm_args,
    vllm_command,
    vllm_cpu_env,
)
from kubetune_cli.localenv.vllm_server import (
    LocalVLLMServer,
    VLLMServerError,
    local_vllm_env,
    serving_venv_dir,
    serving_venv_python,
)

pytestmark = pytest.mark.unit


def test_minimal_args():
    assert vllm_args("/models/base", "m", 8000, "0.0.0.0") == [
        "--model",
        "/models/base",
        "--served-model-name",
        "m",
        "--host",
        "0.0.0.0",
        "--port",
        "8000",
    ]


def test_full_args_with_lora():
    args = vllm_args(
        "/models/base",
        "support-chat",
        8080,
        "0.0.0.0",
        lora_modules={"support-chat-lora": "/models/adapter", "other": "/models/other"},
        max_lora_rank=16,
        max_model_len=2048,
        dtype="bfloat16",
        max_loras=2,
    )
    assert args == [
        "--model",
        "/models/base",
        "--served-model-name",
        "support-chat",
        "--host",
        "0.0.0.0",
        "--port",
        "8080",
        "--dtype",
        "bfloat16",
        "--max-model-len",
        "2048",
        "--enable-lora",
        "--lora-modules",
        "support-chat-lora=/models/adapter",
        "other=/models/other",
        "--max-lora-rank",
        "16",
        "--max-loras",
        "2",
    ]


def test_enforce_eager_and_rank_only_enables_lora():
    args = vllm_args("/m", None, 1, "127.0.0.1", max_lora_rank=8, enforce_eager=True)
    assert "--served-model-name" not in args
    assert args[-4:] == ["--enable-lora", "--max-lora-rank", "8", "--enforce-eager"]


@pytest.mark.parametrize(
    "kwargs, match",
    [
        ({"port": 0}, "port"),
        ({"port": 70000}, "port"),
        ({"host": ""}, "host"),
        ({"model_path": ""}, "model_path"),
        ({"served_model_name": "a b"}, "served_model_name"),
        ({"lora_modules": {"x=y": "/a"}}, "LoRA module name"),
        ({"lora_modules": {"m": "/a"}}, "equals the served model name"),
        ({"lora_modules": {"a": ""}}, "empty path"),
        ({"max_lora_rank": 12}, "max_lora_rank"),
        ({"dtype": "fp8"}, "dtype"),
        ({"max_model_len": 0}, "max_model_len"),
        ({"extra": ["--port", "1"]}, "repeats"),
        ({"extra": ["--dtype=float32"]}, "repeats"),
    ],
)
def test_invalid_inputs_fail_fast(kwargs, match):
    base = dict(model_path="/m", served_model_name="m", port=8000, host="0.0.0.0")
    with pytest.raises(ValueError, match=match):
        vllm_args(**{**base, **kwargs})


def test_lora_rank_bucket():
    assert [lora_rank_bucket(r) for r in (1, 2, 8, 9, 16, 17, 300, 512)] == [1, 8, 8, 16, 16, 32, 320, 512]
    assert set(lora_rank_bucket(r) for r in range(1, 513)) <= set(VLLM_LORA_RANKS)
    with pytest.raises(ValueError):
        lora_rank_bucket(0)
    with pytest.raises(ValueError):
        lora_rank_bucket(513)


def test_command_and_envs(tmp_path):
    cmd = vllm_command(python="python3", model_path="/m", served_model_name="m", port=8000, host="0.0.0.0")
    assert cmd[:3] == ["python3", "-m", VLLM_SERVER_MODULE]
    assert vllm_cpu_env(1)["VLLM_TARGET_DEVICE"] == "cpu"
    assert vllm_cpu_env(1)["VLLM_CPU_KVCACHE_SPACE"] == "1"
    assert vllm_cpu_env(0.5)["VLLM_CPU_KVCACHE_SPACE"] == "0.5"
    with pytest.raises(ValueError):
        vllm_cpu_env(0)
    env = local_vllm_env(tmp_path / "venv", {"PATH": "/usr/bin", "PYTHONPATH": "/main", "VIRTUAL_ENV": "/main/.venv"})
    assert "PYTHONPATH" not in env
    assert env["VIRTUAL_ENV"] == str(tmp_path / "venv")
    assert env["PATH"].split(":")[0] == str(tmp_path / "venv" / "bin")
    assert env["VLLM_HOST_IP"] == "127.0.0.1" and env["HF_HUB_OFFLINE"] == "1"


def test_venv_resolution(tmp_path, monkeypatch):
    monkeypatch.delenv("KUBETUNE_VLLM_VENV", raising=False)
    monkeypatch.setenv("KUBETUNE_CACHE", str(tmp_path))
    assert serving_venv_dir() == tmp_path / "vllm-venv"
    assert serving_venv_python() is None  # no stamp
    monkeypatch.setenv("KUBETUNE_VLLM_VENV", str(tmp_path / "other"))
    assert serving_venv_dir() == tmp_path / "other"


def test_local_server_validates_before_start_and_binds_loopback(tmp_path):
    with pytest.raises(ValueError, match="max_lora_rank"):
        LocalVLLMServer(tmp_path, "m", max_lora_rank=3)
    srv = LocalVLLMServer(tmp_path, "m", lora_modules={"a": tmp_path}, max_lora_rank=8, venv=tmp_path / "v")
    cmd = srv.command()
    assert cmd[0] == str(tmp_path / "v" / "bin" / "python")
    assert cmd[cmd.index("--host") + 1] == "127.0.0.1"
    assert "--enforce-eager" in cmd
    with pytest.raises(VLLMServerError, match="serving-venv.sh"):
        srv.start()


def test_cpu_servable_problems():
    assert cpu_servable_problems({"hidden_size": 128, "num_attention_heads": 2}) == []
    assert cpu_servable_problems({"head_dim": 64, "hidden_size": 64, "num_attention_heads": 4}) == []
    (problem,) = cpu_servable_problems({"hidden_size": 64, "num_attention_heads": 4})
    assert "head size 16" in problem
    assert 64 in VLLM_CPU_HEAD_SIZES and 16 not in VLLM_CPU_HEAD_SIZES
    assert cpu_servable_problems({}) == []


def test_local_server_refuses_unservable_model_before_starting(tmp_path, monkeypatch):
    import json

    (tmp_path / "config.json").write_text(json.dumps({"hidden_size": 64, "num_attention_heads": 4}))
    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin" / "python").symlink_to("/bin/false")
    (venv / ".kubetune-serving-stamp").write_text("x")
    with pytest.raises(VLLMServerError, match="head size 16"):
        LocalVLLMServer(tmp_path, "m", venv=venv).start()


def test_chat_template_and_max_loras():
    args = vllm_args(
        "/b",
        "m",
        8000,
        "127.0.0.1",
        lora_modules={"a": "/a"},
        max_loras=3,
        chat_template="/models/model/chat_template.jinja",
    )
    assert args[args.index("--max-loras") + 1] == "3"
    assert args[args.index("--chat-template") + 1] == "/models/model/chat_template.jinja"
    with pytest.raises(ValueError, match="repeats flags"):
        vllm_args("/b", "m", 8000, "127.0.0.1", extra=["--chat-template", "x"])
    with pytest.raises(ValueError, match="chat_template is empty"):
        vllm_args("/b", "m", 8000, "127.0.0.1", chat_template=" ")
