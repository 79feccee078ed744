"""A weighted mixture of two sources trains in its proportions (counted from the rows each rank trained on),
an Alpaca-style JSON array file serves as the held-out set, and a named chat template is trained with and
exported for the inference server. One short LoRA run on the tiny Llama, 2 workers, ZeRO-2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from trainer_helpers import BUCKET, TrainerEnv, fortunes, put_jsonl, put_parquet

from kubetune import chat_templates

pytestmark = [pytest.mark.training]


@pytest.mark.timeout(900)
def test_mixture_3_to_1_alpaca_validation_and_named_template(trainer_env: TrainerEnv, tmp_path: Path) -> None:
    env = trainer_env
    chats = [
        {
            "messages": [
                {"role": "user", "content": "Tell me a fortune about computers."},
                {"role": "assistant", "content": t},
            ]
        }
        for t in fortunes("computers", limit=120)
    ]
    instructions = [
        {"question": "Quote the science fortune, please.", "answer": t} for t in fortunes("science", limit=30)
    ]
    alpaca = [{"instruction": "Quote a linux fortune.", "input": "", "output": t} for t in fortunes("linux", limit=12)]
    a = put_jsonl(env.client, f"s3://{BUCKET}/data/mix/chat.jsonl", chats)
    b = put_parquet(env.client, f"s3://{BUCKET}/data/mix/instructions.parquet", instructions)
    bucket_key = "data/mix/alpaca_eval.json"
    env.client.put_object(Bucket=BUCKET, Key=bucket_key, Body=json.dumps(alpaca, indent=2).encode())
    spec = {
        "model": {"uri": env.model_uri},
        "dataset": {
            "format": "instruction",
            "fields": {"prompt": "instruction", "input": "input", "response": "output"},
            "sources": [
                {"uri": a, "weight": 3, "format": "chat"},
                {"uri": b, "weight": 1, "fields": {"prompt": "question", "response": "answer"}},
            ],
            "validation": f"s3://{BUCKET}/{bucket_key}",
            "chatTemplate": "zephyr",
            "preprocessing": {"maxSeqLength": 32, "packing": False, "deduplicate": False},
        },
        "training": {
            "method": "lora",
            "lora": {"r": 4, "alpha": 8},
            "epochs": 1,
            "perDeviceBatchSize": 4,
            "learningRate": 3e-3,
            "evalIntervalSteps": 100,
            "checkpoint": {"intervalSteps": 100},
            "deepspeed": {"zeroStage": 2},
        },
    }
    cfg = env.config("mixture-3-1", spec)
    trace_dir = tmp_path / "trace"
    trace_dir.mkdir()
    run = env.run(cfg, env={"KUBETUNE_TRACE_DIR": str(trace_dir)})
    assert run.returncode == 0, run.output[-6000:]

    # Which source each trained row came from: the rows each rank's trace names, looked up in its shard.
    from kubetune_trainer.data import load_shard

    prepared = [k for k in env.keys(f"{cfg['runUri']}/prepared") if k.endswith("manifest.json")]
    manifest = env.get_json(f"{cfg['runUri']}/prepared/{prepared[0]}")
    assert manifest["stats"]["sourceRecords"][1] == 30  # the smaller source, read to its end
    assert manifest["stats"]["validationRecords"] == 12 == len(alpaca)  # every Alpaca element held out
    counts = {"chat": 0, "instruction": 0}
    for rank, shard in enumerate(manifest["train_shards"]):
        ids = load_shard([shard], client=env.client)["input_ids"]
        lines = (trace_dir / f"rank-{rank}.jsonl").read_text().splitlines()
        rows = [r for line in lines for r in json.loads(line)["rows"]]
        # one epoch, each row once (a last incomplete batch of the epoch is left out)
        assert len(rows) == len(set(rows)) and manifest["rows_per_shard"] - 4 < len(rows) <= manifest["rows_per_shard"]
        for r in rows:
            text = _decode(ids[r])
            assert text.startswith("<|user|>\n"), text  # rendered with the zephyr template
            counts["chat" if "about computers" in text else "instruction"] += 1
    ratio = counts["chat"] / counts["instruction"]
    print(f"mixture counted from the trace: {counts}, ratio {ratio:.3f} (weights 3:1)")
    assert abs(ratio - 3.0) <= 0.15, counts

    # The template the model was trained with is exported for the inference server (--chat-template).
    template = _text(env, f"{cfg['runUri']}/model/{chat_templates.EXPORT_FILE}")
    assert template == chat_templates.ZEPHYR


_TOKENIZER = None


def _decode(ids) -> str:
    global _TOKENIZER
    if _TOKENIZER is None:
        from kubetune_cli.localenv.models import smollm2_tokenizer

        _TOKENIZER = smollm2_tokenizer()
    return _TOKENIZER.decode([int(t) for t in ids if int(t) != _TOKENIZER.pad_token_id])


def _text(env: TrainerEnv, uri: str) -> str:
    bucket, key = uri[len("s3://") :].split("/", 1)
    return env.client.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
