"""Serving status, pure: the Deployed condition from Deployment status as the Deployment controller writes it
(kubetune_cli.localenv.kubelet), the deployment gate, status.endpoint, the state summary and the Events.
"""

from __future__ import annotations

from typing import Any

import pytest

from kubetune import api
from kubetune_cli.localenv.kubelet import deployment_status, replica_set_name
from kubetune_operator import conditions as c
from kubetune_operator.reconcile_deploy import deployed_condition, gate
from kubetune_operator.status import Observation, desired_status, state_of, status_patch, transition_events

pytestmark = pytest.mark.unit

ENDPOINT = {"url": "http://chat-inference.ns.svc:8000/v1", "model": "chat"}


def deployment(replicas: int = 1, generation: int = 1, status: dict | None = None) -> dict[str, Any]:
    return {
        "metadata": {"name": "chat-inference", "generation": generation},
        "spec": {
            "replicas": replicas,
            "template": {"metadata": {"labels": {"a": "b"}}},
            "strategy": {"type": "RollingUpdate", "rollingUpdate": {"maxSurge": 1, "maxUnavailable": 0}},
        },
        "status": status or {},
    }


def test_follows_the_rollout() -> None:
    dep = deployment()
    assert deployed_condition(dep, ENDPOINT)[:2] == (c.FALSE, c.PROGRESSING)  # the controller has not looked yet
    dep["status"] = deployment_status(dep, ready=0)
    status, reason, message = deployed_condition(dep, ENDPOINT)
    assert (status, reason) == (c.FALSE, c.PROGRESSING) and "0/1 replicas available" in message
    assert {x["reason"] for x in dep["status"]["conditions"]} == {"MinimumReplicasUnavailable", "NewReplicaSetCreated"}
    dep["status"] = deployment_status(dep)
    status, reason, message = deployed_condition(dep, ENDPOINT)
    assert (status, reason) == (c.TRUE, c.AVAILABLE)
    assert message == "1/1 replicas available; serving chat at http://chat-inference.ns.svc:8000/v1"
    progressing = next(x for x in dep["status"]["conditions"] if x["type"] == "Progressing")
    assert progressing["message"] == f'ReplicaSet "{replica_set_name(dep)}" has successfully progressed.'


def test_scaling_up_keeps_serving_while_rolling_out() -> None:
    dep = deployment()
    dep["status"] = deployment_status(dep)
    dep["spec"]["replicas"], dep["metadata"]["generation"] = 2, 2  # the spec changed; status still generation 1
    status, reason, message = deployed_condition(dep, ENDPOINT)
    assert (status, reason) == (c.TRUE, c.AVAILABLE) and message.endswith("(rolling out)")
    dep["status"] = deployment_status(dep, ready=1)  # maxUnavailable 0: Available needs both
    assert deployed_condition(dep, ENDPOINT)[:2] == (c.FALSE, c.PROGRESSING)
    dep["status"] = deployment_status(dep)
    status, _, message = deployed_condition(dep, ENDPOINT)
    assert status == c.TRUE and message.startswith("2/2") and "rolling out" not in message


def test_failures_carry_the_controllers_message() -> None:
    dep = deployment()
    dep["status"] = deployment_status(dep, ready=0, timed_out=True)
    status, reason, message = deployed_condition(dep, ENDPOINT)
    assert (status, reason) == (c.FALSE, c.PROGRESS_DEADLINE_EXCEEDED) and "has timed out progressing" in message
    dep = deployment()
    dep["status"] = deployment_status(dep, failure='pods "x" is forbidden: exceeded quota: gpu')
    status, reason, message = deployed_condition(dep, ENDPOINT)
    assert (status, reason) == (c.FALSE, c.REPLICA_FAILURE) and "exceeded quota" in message


def test_zero_replicas_is_scaled_to_zero() -> None:
    dep = deployment(replicas=0)
    dep["status"] = deployment_status(dep)
    assert dep["status"]["conditions"][0]["status"] == "True"  # the controller calls 0/0 available
    assert deployed_condition(dep, ENDPOINT)[:2] == (c.FALSE, c.SCALED_TO_ZERO)


def _spec(min_improvement: float | None) -> api.FineTuneJobSpec:
    return api.FineTuneJobSpec.model_validate(
        {
            "model": {"uri": "s3://models/base"},
            "dataset": {"train": "s3://data/train.jsonl", "validationSplit": 0.1, "format": "completion"},
            "output": {"uri": "s3://runs/x"},
            "deploy": {"minImprovement": min_improvement} if min_improvement is not None else {},
        }
    )


def test_gate() -> None:
    ev = {"metric": "evalLoss", "base": 4.52, "fineTuned": 4.50, "improvement": 0.02}
    assert gate(_spec(None), None) is None
    assert gate(_spec(0.01), ev) is None
    assert gate(_spec(0.02), ev) is None  # at least minImprovement
    reason, message = gate(_spec(0.05), ev)
    assert reason == c.NOT_IMPROVED
    assert "base 4.52" in message and "fine-tuned 4.5" in message and "0.05" in message and "evalLoss" in message
    reason, message = gate(_spec(0.05), None)
    assert reason == c.AWAITING_EVALUATION and "status.evaluation.improvement" in message
    assert gate(_spec(0.0), {"metric": "evalLoss", "improvement": -0.3})[0] == c.NOT_IMPROVED
    reason, message = gate(_spec(0.0), {"metric": "evalLoss", "fineTuned": 3.9})  # no base figures
    assert reason == c.NOT_IMPROVED and "base unknown" in message


SUCCEEDED = [{"type": "Succeeded", "status": "True", "reason": "JobSucceeded"}]


@pytest.mark.parametrize(
    "status, reason, state",
    [
        (c.TRUE, c.AVAILABLE, "Deployed"),
        (c.FALSE, c.PROGRESSING, "Deploying"),
        (c.FALSE, c.AWAITING_EVALUATION, "Deploying"),
        (c.FALSE, c.PROGRESS_DEADLINE_EXCEEDED, "Deploying"),
        (c.FALSE, c.DISABLED, "Succeeded"),
        (c.FALSE, c.NOT_IMPROVED, "Succeeded"),
        (c.FALSE, c.SCALED_TO_ZERO, "Succeeded"),
    ],
)
def test_state(status: str, reason: str, state: str) -> None:
    assert state_of(SUCCEEDED + [{"type": "Deployed", "status": status, "reason": reason}]) == state


def test_endpoint_is_owned_set_and_removed() -> None:
    current = {"conditions": SUCCEEDED, "model": {"uri": "s3://runs/x/model"}}
    obs = Observation(endpoint=ENDPOINT, extra_conditions=[(c.DEPLOYED, c.FALSE, c.PROGRESSING, "waiting")])
    deploying = desired_status(current, obs, "t1")
    assert deploying["endpoint"] == ENDPOINT and deploying["state"] == "Deploying"
    patch = status_patch(current, deploying)
    assert set(patch) == {"conditions", "state", "endpoint"}  # never the trainer's keys (model)
    up = desired_status(
        {**current, **deploying},
        Observation(endpoint=ENDPOINT, extra_conditions=[(c.DEPLOYED, c.TRUE, c.AVAILABLE, "1/1")]),
        "t2",
    )
    assert up["state"] == "Deployed"
    assert [(e.type, e.reason) for e in transition_events(deploying, up)] == [("Normal", "Deployed")]
    off = desired_status(
        up, Observation(endpoint=None, extra_conditions=[(c.DEPLOYED, c.FALSE, c.DISABLED, "off")]), "t3"
    )
    assert "endpoint" not in off and status_patch(up, off)["endpoint"] is None
    assert off["state"] == "Succeeded"
    assert [(e.type, e.reason) for e in transition_events(up, off)] == [("Normal", "Disabled")]
    failing = desired_status(up, Observation(extra_conditions=[(c.DEPLOYED, c.FALSE, c.REPLICA_FAILURE, "q")]), "t4")
    assert failing["endpoint"] == ENDPOINT  # KEEP: a status pass that did not look leaves it
    assert [(e.type, e.reason) for e in transition_events(up, failing)] == [("Warning", "ReplicaFailure")]


# --- the step's error handling, with a stand-in for the API ---------------------------------------------------


class _FailingKube:
    """Enough of kubetune_operator.kube.Kube for the serving step: nothing exists, creating fails."""

    def __init__(self, status: int):
        self.status = status
        self.events: list[tuple[str, str]] = []

    def get(self, kind: Any, namespace: str, name: str) -> None:
        return None

    def create(self, obj: dict) -> Any:
        from kubetune_operator.kube import KubeError

        raise KubeError(self.status, "Boom", f"create {obj['kind']}")

    def post_event(self, involved: dict, type_: str, reason: str, message: str) -> None:
        self.events.append((type_, reason))


def _succeeded_context(kube: Any) -> Any:
    from kubetune_operator.meta import Owner
    from kubetune_operator.reconcile import Context
    from kubetune_operator.settings import Settings

    body = {
        "metadata": {"name": "chat", "namespace": "ns", "uid": "u1", "generation": 1},
        "spec": _spec(None).wire(),
        "status": {"conditions": SUCCEEDED},
    }
    ctx = Context(kube=kube, settings=Settings(), body=body, owner=Owner.from_body(body), raw_spec=body["spec"])
    ctx.spec = _spec(None)
    return ctx


def test_api_errors_are_reported_and_retried_rejections_are_not() -> None:
    from kubetune_operator.reconcile import Retry
    from kubetune_operator.reconcile_deploy import ensure_serving

    ctx = _succeeded_context(_FailingKube(500))
    with pytest.raises(Retry):
        ensure_serving(ctx)
    assert ctx.obs.extra_conditions[-1][:3] == (c.DEPLOYED, c.FALSE, c.SERVING_ERROR)
    ctx = _succeeded_context(_FailingKube(422))
    ensure_serving(ctx)  # what we built does not fit this cluster: say so, do not spin
    assert ctx.obs.extra_conditions[-1][:3] == (c.DEPLOYED, c.FALSE, c.SERVING_REJECTED)


def test_status_passes_are_requeued_and_close_cancels() -> None:
    import threading

    from kubetune_operator.reconcile import Reconciler, Retry
    from kubetune_operator.settings import Settings

    rec = Reconciler(_FailingKube(500), Settings())  # type: ignore[arg-type]  # a Kube whose every call fails
    served = threading.Event()
    rec.serve = lambda ns, name: served.set()  # type: ignore[method-assign]  # record the requeued serve step
    rec._requeue("ns", "chat", Retry("x", 0.05))
    assert served.wait(5), "the requeued pass did not run"
    served.clear()
    rec._requeue("ns", "chat", Retry("x", 0.5))
    rec.close()
    assert not served.wait(1), "close() must cancel pending retries"
