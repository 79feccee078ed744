"""Preference records (prompt + chosen + rejected, as text or chat messages): parsing, the pair's shared row
with the rejected sequence at its own positions, targets only on the responses, and prepare() end to end."""

from __future__ import annotations

import numpy as np
import pytest

from kubetune.api import DatasetSpec
from kubetune_trainer.data import load_shard, prepare
from kubetune_trainer.data.encode import IGNORE, Encoder
from kubetune_trainer.data.packing import Packer, spill_columns
from kubetune_trainer.data.records import RecordRules, parse_record
from kubetune_trainer.data.spill import RowSpill

RULES = RecordRules.from_spec(
    DatasetSpec.model_validate({"train": "s3://bucket/p.jsonl", "format": "preference"}), None
)


@pytest.mark.unit
@pytest.mark.parametrize(
    "value,reason",
    [
        ({"prompt": "Q?", "chosen": "Good.", "rejected": "Bad."}, None),
        (
            {
                "prompt": [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "Q?"}],
                "chosen": [{"role": "assistant", "content": "Good."}],
                "rejected": [{"role": "assistant", "content": "Bad."}],
            },
            None,
        ),
        ({"prompt": "Q?", "chosen": "Good."}, "missing_field"),
        ({"prompt": "Q?", "chosen": "Same.", "rejected": "Same."}, "same_responses"),
        ({"prompt": "Q?", "chosen": "", "rejected": "Bad."}, "empty_text"),
        ({"prompt": "Q?", "chosen": [{"role": "user", "content": "x"}], "rejected": "Bad."}, "unknown_role"),
        ({"prompt": "Q?", "chosen": 3, "rejected": "Bad."}, "wrong_type"),
    ],
)
def test_parse_preference(value, reason):
    ex = parse_record(value, RULES)
    if reason:
        assert ex == reason
    else:
        assert ex.chosen[-1] == ("assistant", "Good.") and ex.rejected[-1] == ("assistant", "Bad.")
        assert ex.messages[-1] == ("user", "Q?")


@pytest.mark.unit
def test_pair_in_one_row_targets_only_responses(tokenizer, tmp_path):
    ex = parse_record(
        {
            "prompt": [
                {"role": "user", "content": "Q?"},
                {"role": "assistant", "content": "Earlier."},
                {"role": "user", "content": "And now?"},
            ],
            "chosen": "Good answer.",
            "rejected": "Bad answer.",
        },
        RULES,
    )
    (enc,) = Encoder(tokenizer, "preference", 64).encode([ex])
    chosen_ids, rejected_ids = enc.input_ids[: enc.boundary], enc.input_ids[enc.boundary :]
    text = tokenizer.decode([int(t) for t in chosen_ids])
    assert text.endswith("<|im_start|>assistant\nGood answer.<|im_end|>\n") and "Earlier." in text
    assert tokenizer.decode([int(t) for t in rejected_ids]).endswith("assistant\nBad answer.<|im_end|>\n")
    targets = [
        tokenizer.decode([int(t) for t, lab in zip(ids, labs) if lab != IGNORE])
        for ids, labs in ((chosen_ids, enc.labels[: enc.boundary]), (rejected_ids, enc.labels[enc.boundary :]))
    ]
    assert targets == ["Good answer.<|im_end|>\n", "Bad answer.<|im_end|>\n"]  # not the prompt's assistant turn

    spill = RowSpill(str(tmp_path / "s"), spill_columns(False, 128))
    packer = Packer(spill, 128, 0, pack=False, classification=False)
    packer.add(enc)
    packer.finish()
    row = {k: v[0] for k, v in spill.read().items()}
    n, b = len(enc.input_ids), enc.boundary
    assert list(row["segment_ids"][:n]) == [1] * b + [2] * (n - b) and row["segment_ids"][n:].sum() == 0
    assert list(row["position_ids"][:n]) == list(range(b)) + list(range(n - b))
    assert row["labels"][b] == IGNORE  # nothing predicts the rejected sequence from the chosen one


@pytest.mark.integration
def test_prepare_preference_jsonl(tokenizer, s3, put, prefix, make_cfg):
    records = [
        {
            "prompt": f"Say something about {i}.",
            "chosen": f"The number {i} is fine.",
            "rejected": f"fine {i} is number The.",
        }
        for i in range(30)
    ]
    records.append({"prompt": "x", "chosen": "same", "rejected": "same"})
    uri = put(f"{prefix}/pref/pairs.jsonl", records)
    cfg = make_cfg(
        {"train": uri, "format": "preference", "validationSplit": 0.2, "preprocessing": {"maxSeqLength": 64}},
        training={"objective": "dpo"},
    )
    p = prepare(cfg, tokenizer, num_shards=2, client=s3)
    assert p.stats["invalidByReason"] == {"same_responses": 1}
    assert p.stats["trainRecords"] + p.stats["validationRecords"] == 30
    data = load_shard(p.train_shards + p.validation_shards, client=s3)
    assert len(data["input_ids"]) == 30 - p.dropped_sequences  # one row per pair, never packed
    assert p.seq_length <= 128 and all(
        set(np.unique(s)) == {0, 1, 2} or set(np.unique(s)) == {1, 2} for s in data["segment_ids"]
    )
