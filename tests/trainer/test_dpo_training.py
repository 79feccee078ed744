"""DPO end to end on the tiny Llama: preference pairs from real text (chosen: a fortune; rejected: the same
fortune's words shuffled) raise held-out preference accuracy above the base model's. LoRA (the reference is the
base with the adapters switched off), ZeRO-2, 2 workers; metrics, the evaluation report and its summary."""

from __future__ import annotations

import random

import pytest
from trainer_helpers import BUCKET, TrainerEnv, fortunes, put_jsonl

pytestmark = [pytest.mark.training]


def preference_pairs(name: str, limit: int, seed: int = 0) -> list[dict[str, str]]:
    """chosen = a real fortune (one line), rejected = its words in a random order."""
    rng = random.Random(seed)
    out = []
    for text in fortunes(name):
        words = text.split()
        if not 4 <= len(words) <= 20:
            continue
        shuffled = words[:]
        while shuffled == words:
            rng.shuffle(shuffled)
        out.append({"prompt": "Tell me a fortune.", "chosen": " ".join(words), "rejected": " ".join(shuffled)})
        if len(out) == limit:
            break
    return out


@pytest.mark.timeout(1500)
def test_dpo_lora_raises_held_out_preference_accuracy(trainer_env: TrainerEnv) -> None:
    env = trainer_env
    data = put_jsonl(env.client, f"s3://{BUCKET}/data/dpo/pairs.jsonl", preference_pairs("computers", 160))
    spec = {
        "model": {"uri": env.model_uri},
        "dataset": {
            "train": data,
            "format": "preference",
            "validationSplit": 0.2,
            "chatTemplate": "zephyr",
            "preprocessing": {"maxSeqLength": 48},
        },
        "training": {
            "objective": "dpo",
            "dpo": {"beta": 0.1},
            "method": "lora",
            "lora": {"r": 8, "alpha": 16, "dropout": 0.0, "targetModules": ["all-linear"]},
            "maxSteps": 12,
            "perDeviceBatchSize": 4,
            "learningRate": 1e-2,
            "warmupRatio": 0.0,
            "evalIntervalSteps": 6,
            "checkpoint": {"intervalSteps": 12},
            "deepspeed": {"zeroStage": 2},
        },
    }
    cfg = env.config("dpo-lora", spec)
    run = env.run(cfg, timeout=1200)  # three passes per step (reference, policy, backward)
    assert run.returncode == 0, run.output[-6000:]

    steps = {m["step"]: m for m in env.metrics(cfg["runUri"]) if "loss" in m and "event" not in m}
    assert abs(steps[1]["loss"] - 0.6931) < 0.05  # DPO starts at log 2: policy == reference
    assert steps[12]["loss"] < steps[1]["loss"]
    assert {"evalPreferenceAccuracy", "evalRewardMargin"} <= set(steps[12])

    report = env.get_json(f"{cfg['runUri']}/eval/report.json")
    base, fine = report["base"], report["fineTuned"]
    print(
        f"held-out preference accuracy: base {base['preferenceAccuracy']:.3f} -> "
        f"fine-tuned {fine['preferenceAccuracy']:.3f}; reward margin {fine['rewardMargin']:.3f}; "
        f"DPO loss {base['evalLoss']:.4f} -> {fine['evalLoss']:.4f}"
    )
    assert report["metric"] == "preferenceAccuracy"
    assert fine["preferenceAccuracy"] > base["preferenceAccuracy"]
    assert base["rewardMargin"] == 0.0 and fine["rewardMargin"] > 0
    assert report["improvement"]["preferenceAccuracy"] == pytest.approx(
        fine["preferenceAccuracy"] - base["preferenceAccuracy"]
    )
    assert {"adapter_config.json", "adapter_model.safetensors", "chat_template.jinja"} <= set(
        env.keys(f"{cfg['runUri']}/model")
    )
