"""DPO's pure parts: the loss against its formula, per-segment log-probabilities, the spec's rules for the
objective, and the metric a DPO job is judged and gated on."""

from __future__ import annotations

import math

import pytest

from kubetune.api import cross_field_errors, parse_spec
from kubetune_trainer.evaluate import improvement, objective_metric, summary

pytestmark = pytest.mark.unit


def test_dpo_loss_matches_the_paper():
    import torch

    from kubetune_trainer.preference import dpo_loss

    policy = torch.tensor([[-10.0, -12.0], [-5.0, -4.0]])
    reference = torch.tensor([[-11.0, -11.0], [-5.0, -4.0]])
    losses, margins = dpo_loss(policy, reference, beta=0.5)
    # -log sigmoid(beta * ((pi_w - ref_w) - (pi_l - ref_l)))
    expected_margin = 0.5 * ((-10 + 11) - (-12 + 11))
    assert margins[0].item() == pytest.approx(expected_margin)
    assert losses[0].item() == pytest.approx(-math.log(1 / (1 + math.exp(-expected_margin))))
    assert losses[1].item() == pytest.approx(math.log(2))  # policy == reference
    assert margins[1].item() == 0.0


def test_pair_logps_sums_each_segments_targets():
    import torch

    from kubetune_trainer.preference import pair_logps

    vocab = 5
    ids = torch.tensor([[1, 2, 3, 1, 4, 0]])
    labels = torch.tensor([[-100, 2, 3, -100, 4, -100]])
    segments = torch.tensor([[1, 1, 1, 2, 2, 0]])
    logits = torch.randn(1, 6, vocab)
    got = pair_logps(logits, labels, segments)
    logp = torch.log_softmax(logits, -1)
    chosen = logp[0, 0, 2] + logp[0, 1, 3]  # position t predicts label t+1
    rejected = logp[0, 3, 4]
    assert got.shape == (1, 2)
    assert got[0, 0].item() == pytest.approx(chosen.item(), abs=1e-5)
    assert got[0, 1].item() == pytest.approx(rejected.item(), abs=1e-5)
    assert ids.shape == labels.shape


def _spec(**over) -> dict:
    spec = {
        "model": {"uri": "s3://bucket/m"},
        "output": {"uri": "s3://bucket/out"},
        "dataset": {"train": "s3://bucket/p.jsonl", "format": "preference", "validationSplit": 0.1},
        "training": {"objective": "dpo"},
    }
    for k, v in over.items():
        spec[k] = {**spec[k], **v}
    return spec


@pytest.mark.parametrize(
    "over,path",
    [
        ({"dataset": {"format": "chat"}}, "spec.dataset.format"),
        ({"training": {"objective": None}}, "spec.training.objective"),
        ({"training": {"objective": "sft", "dpo": {"beta": 0.2}}, "dataset": {"format": "chat"}}, "spec.training.dpo"),
    ],
)
def test_objective_rules_name_the_field(over, path):
    with pytest.raises(ValueError, match=path.replace(".", r"\.")):
        parse_spec(_spec(**over))


def test_dpo_job_is_judged_and_gated_on_preference_accuracy():
    from kubetune_operator.reconcile_deploy import gate

    spec = parse_spec(_spec())
    assert cross_field_errors(spec) == []
    assert objective_metric(spec) == "preferenceAccuracy"
    assert improvement("preferenceAccuracy", 0.55, 0.8) == pytest.approx(0.25)
    gated = parse_spec({**_spec(), "deploy": {"minImprovement": 0.3}})
    s = summary(
        {"base": {"preferenceAccuracy": 0.55}, "fineTuned": {"preferenceAccuracy": 0.8}},
        "preferenceAccuracy",
        "s3://bucket/r.json",
    ).wire()
    verdict = gate(gated, s)
    assert verdict is not None and "preferenceAccuracy" in verdict[1] and "0.25" in verdict[1]
    assert gate(parse_spec({**_spec(), "deploy": {"minImprovement": 0.2}}), s) is None
