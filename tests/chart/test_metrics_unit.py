"""The operator's metrics module: pure update functions, its own registry, served over HTTP on loopback."""

from __future__ import annotations

import urllib.request

import pytest
from prometheus_client import REGISTRY

from kubetune_operator.metrics import OperatorMetrics

pytestmark = pytest.mark.unit


def _val(m: OperatorMetrics, name: str, **labels: str) -> float | None:
    return m.registry.get_sample_value(name, labels)


def _status(state: str, **extra):
    conds = {
        "Pending": [],
        "Training": [("Training", "True")],
        "Succeeded": [("Succeeded", "True")],
        "Failed": [("Failed", "True")],
    }.get(state, [])
    return {"state": state, "conditions": [{"type": t, "status": s} for t, s in conds], **extra}


def test_counts_follow_states_and_fall_to_zero():
    m = OperatorMetrics()
    m.observe_job("a", "j1", None)
    m.observe_job("a", "j2", _status("Pending"))
    assert _val(m, "kubetune_finetunejobs", namespace="a", state="Unknown") == 1
    assert _val(m, "kubetune_finetunejobs", namespace="a", state="Pending") == 1
    m.observe_job("a", "j1", _status("Training"))
    assert _val(m, "kubetune_finetunejobs", namespace="a", state="Unknown") == 0
    assert _val(m, "kubetune_finetunejobs", namespace="a", state="Training") == 1
    assert _val(m, "kubetune_finetunejob_conditions", namespace="a", condition="Training", status="True") == 1
    m.forget_job("a", "j1")
    assert _val(m, "kubetune_finetunejobs", namespace="a", state="Training") == 0
    assert _val(m, "kubetune_finetunejob_conditions", namespace="a", condition="Training", status="True") == 0
    assert m.job_count("a") == 1


def test_durations_observed_once_per_transition_not_on_first_sighting():
    m = OperatorMetrics()
    created = "2026-01-01T00:00:00Z"
    # First sighting already started (operator restart): seeds, observes nothing.
    m.observe_job("ns", "old", _status("Training", startTime="2026-01-01T00:00:05Z"), created=created)
    assert _val(m, "kubetune_time_to_training_start_seconds_count") == 0
    m.observe_job("ns", "j", _status("Pending"), created=created)
    m.observe_job("ns", "j", _status("Training", startTime="2026-01-01T00:01:00Z"), created=created)
    m.observe_job("ns", "j", _status("Training", startTime="2026-01-01T00:01:00Z"), created=created)
    assert _val(m, "kubetune_time_to_training_start_seconds_count") == 1
    assert _val(m, "kubetune_time_to_training_start_seconds_sum") == 60
    done = _status("Failed", startTime="2026-01-01T00:01:00Z", completionTime="2026-01-01T01:01:00Z")
    m.observe_job("ns", "j", done, created=created)
    m.observe_job("ns", "j", done, created=created)
    assert _val(m, "kubetune_training_duration_seconds_count", outcome="failed") == 1
    assert _val(m, "kubetune_training_duration_seconds_sum", outcome="failed") == 3600


def test_progress_mirrored_and_removed():
    m = OperatorMetrics()
    m.observe_job(
        "ns",
        "j",
        {
            "state": "Training",
            "progress": {"step": 10, "totalSteps": 40, "percent": 25, "loss": 1.5, "tokensPerSecond": 900.0},
        },
    )
    assert _val(m, "kubetune_job_progress_step", namespace="ns", job="j") == 10
    assert _val(m, "kubetune_job_progress_ratio", namespace="ns", job="j") == 0.25
    assert _val(m, "kubetune_job_training_loss", namespace="ns", job="j") == 1.5
    assert _val(m, "kubetune_job_tokens_per_second", namespace="ns", job="j") == 900
    assert _val(m, "kubetune_job_eval_loss", namespace="ns", job="j") is None
    m.forget_job("ns", "j")
    assert _val(m, "kubetune_job_progress_step", namespace="ns", job="j") is None


def test_reconcile_timing_and_error_kinds():
    m = OperatorMetrics()

    class TemporaryError(Exception):
        pass

    with m.time_reconcile("create"):
        pass
    with pytest.raises(TemporaryError), m.time_reconcile("create"):
        raise TemporaryError("retry")
    with pytest.raises(ValueError), m.time_reconcile("create"):
        raise ValueError("bug")
    assert _val(m, "kubetune_reconcile_duration_seconds_count", handler="create") == 3
    assert _val(m, "kubetune_reconcile_errors_total", handler="create", kind="temporary") == 1
    assert _val(m, "kubetune_reconcile_errors_total", handler="create", kind="unexpected") == 1


def test_own_registry_and_served_on_loopback():
    m = OperatorMetrics()
    assert REGISTRY.get_sample_value("kubetune_finetunejobs", {"namespace": "x", "state": "Pending"}) is None
    m.observe_job("x", "j", _status("Pending"))
    server = m.serve(0, "127.0.0.1")
    try:
        host, port = server.server_address[:2]
        assert host == "127.0.0.1"
        body = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
        assert 'kubetune_finetunejobs{namespace="x",state="Pending"} 1.0' in body
    finally:
        server.shutdown()
        server.server_close()
