"""training.gradientCheckpointing, training.attention and training.ligerKernels as model.load_model applies
them, on a tiny random Llama on CPU (real transformers and peft)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from kubetune.api import FineTuneJobSpec

pytestmark = pytest.mark.unit


def _spec(**training: Any) -> FineTuneJobSpec:
    return FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "s3://bucket/model"},
            "output": {"uri": "s3://bucket/out"},
            "dataset": {"train": "s3://bucket/data.jsonl", "format": "completion"},
            "training": training,
        }
    )


@pytest.fixture(scope="module")
def tiny(tmp_path_factory: pytest.TempPathFactory) -> Path:
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    folder = tmp_path_factory.mktemp("tiny-llama")
    LlamaForCausalLM(
        LlamaConfig(
            hidden_size=64,
            intermediate_size=128,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            vocab_size=512,
        )
    ).save_pretrained(folder)
    return folder


def _loss_and_grads(spec: FineTuneJobSpec, folder: Path) -> tuple[float, dict[str, Any], Any]:
    import torch

    from kubetune_trainer.model import load_model

    torch.manual_seed(1)  # the same LoRA initialisation in both runs
    model = load_model(spec, folder, precision="fp32", pad_token_id=0)
    ids = torch.randint(0, 512, (2, 24), generator=torch.Generator().manual_seed(2))
    # Packed rows as the trainer feeds them: two examples per row, positions restarting at 0.
    positions = torch.cat([torch.arange(10), torch.arange(14)]).repeat(2, 1)
    loss = model(input_ids=ids, position_ids=positions, labels=ids).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    return loss.item(), grads, model


@pytest.mark.parametrize("method", ["full", "lora"])
def test_gradient_checkpointing_gives_the_same_loss_and_gradients(tiny: Path, method: str) -> None:
    import torch

    plain_loss, plain_grads, plain = _loss_and_grads(_spec(method=method), tiny)
    ckpt_loss, ckpt_grads, ckpt = _loss_and_grads(_spec(method=method, gradientCheckpointing=True), tiny)
    base = lambda m: m.get_base_model() if method == "lora" else m  # noqa: E731 - a one-line local helper
    assert base(ckpt).is_gradient_checkpointing and not base(plain).is_gradient_checkpointing
    print(f"{method}: loss {plain_loss:.6f} without, {ckpt_loss:.6f} with gradient checkpointing")
    assert ckpt_loss == pytest.approx(plain_loss, abs=1e-6)
    assert plain_grads.keys() == ckpt_grads.keys() and plain_grads
    for name, grad in plain_grads.items():
        assert torch.allclose(grad, ckpt_grads[name], atol=1e-6), name


def test_attention_implementation_rules(tiny: Path) -> None:
    import importlib.util

    from kubetune_trainer.model import attention_implementation, load_model

    assert attention_implementation("auto", use_gpu=False) == "sdpa"
    assert attention_implementation("eager", use_gpu=False) == "eager"
    with pytest.raises(ValueError, match="training.attention flash_attention_2"):
        attention_implementation("flash_attention_2", use_gpu=False)
    flash = importlib.util.find_spec("flash_attn") is not None
    assert attention_implementation("auto", use_gpu=True) == ("flash_attention_2" if flash else "sdpa")
    model = load_model(_spec(method="full", attention="eager"), tiny, precision="fp32", pad_token_id=0)
    assert model.config._attn_implementation == "eager"
    model = load_model(_spec(method="full"), tiny, precision="fp32", pad_token_id=0)
    assert model.config._attn_implementation == "sdpa"


def test_liger_kernels_are_ignored_on_cpu(tiny: Path, caplog: pytest.LogCaptureFixture) -> None:
    from kubetune_trainer.model import load_model

    with caplog.at_level("INFO", logger="kubetune_trainer.model"):
        load_model(_spec(method="full", ligerKernels=True), tiny, precision="fp32", pad_token_id=0)
    assert "ligerKernels: ignored on CPU" in caplog.text
