"""Child names: derived, within Kubernetes' and KubeRay's limits, distinct after trimming."""

from __future__ import annotations

import re

import pytest

from kubetune_operator import names

pytestmark = pytest.mark.unit

DNS1123 = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
DNS1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")


def test_short_names_are_kept() -> None:
    assert names.config_map("chat") == "chat-config"
    assert names.service_account("chat") == "chat-trainer"
    assert names.ray_job("chat") == "chat"


@pytest.mark.parametrize("parent", ["a" * 63, "x-" * 31 + "y", "job-" + "9" * 59, "0abc", "1" * 63])
def test_limits_and_shapes(parent: str) -> None:
    for name in (
        names.config_map(parent),
        names.service_account(parent),
        names.role(parent),
        names.role_binding(parent),
        names.label_value(parent),
    ):
        assert len(name) <= 63 and DNS1123.match(name), name
    rj = names.ray_job(parent)
    assert len(rj) <= 47 and DNS1035.match(rj), rj


def test_trimmed_names_stay_distinct() -> None:
    a, b = "a" * 60 + "xyz", "a" * 60 + "xyw"
    assert names.config_map(a) != names.config_map(b)
    assert names.ray_job(a) != names.ray_job(b)
    assert names.config_map(a) == names.config_map(a)  # deterministic: the key to idempotent creates


def test_ray_job_names_start_with_a_letter() -> None:
    name = names.ray_job("7b-chat")
    assert DNS1035.match(name) and name.startswith("ftj-7b-chat-"), name


@pytest.mark.parametrize("a, b", [("7b", "ftj-7b"), ("7b-chat", "ftj-7b-chat"), ("0" * 63, "ftj-" + "0" * 59)])
def test_prefixed_names_never_collide_with_a_job_of_that_name(a: str, b: str) -> None:
    """`ftj-` is added to names that start with a digit; a job really called `ftj-...` must not get the same."""
    assert names.ray_job(a) != names.ray_job(b)
    assert names.inference(a) != names.inference(b)


def test_derived_names_are_distinct_across_many_jobs() -> None:
    jobs = [f"{p}{i}" for p in ("", "ftj-", "a-", "7b-") for i in range(300)] + ["x" * 63, "x" * 62 + "y"]
    for derive in (names.ray_job, names.inference, names.config_map, names.network_policy):
        derived = [derive(j) for j in jobs]
        assert len(set(derived)) == len(jobs), derive.__name__
