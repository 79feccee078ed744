"""The operator's index of live jobs by output prefix (what the overlap guard reads instead of a LIST)."""

from __future__ import annotations

import pytest

from kubetune_operator import guards
from kubetune_operator.jobindex import LiveJobs

pytestmark = pytest.mark.unit


def _job(name: str, uri: str, created: str, *, namespace: str = "ns", done: bool = False) -> dict:
    status = {"conditions": [{"type": "Failed", "status": "True"}]} if done else {}
    return {
        "metadata": {"name": name, "namespace": namespace, "uid": f"uid-{name}", "creationTimestamp": created},
        "spec": {"output": {"uri": uri}},
        "status": status,
    }


def _names(jobs: list[dict]) -> set[str]:
    return {j["metadata"]["name"] for j in jobs}


def test_nesting_finds_prefixes_both_ways_and_nothing_else() -> None:
    index = LiveJobs()
    for job in (
        _job("a", "s3://b/out", "t1"),
        _job("x", "s3://b/out/ns/a", "t2"),
        _job("ab", "s3://b/out", "t3"),
        _job("other", "s3://c/out", "t4"),
        _job("deep", "s3://b/out/ns/a/x/ns/deep", "t5"),
    ):
        index.observe(job)
    assert len(index) == 5
    assert _names(index.nesting(guards.output_base("s3://b/out", "ns", "a"))) == {"a", "x", "deep"}
    assert _names(index.nesting(guards.output_base("s3://b/out/ns/a", "ns", "x"))) == {"a", "x"}  # deep is under a
    assert _names(index.nesting(guards.output_base("s3://b/out", "ns", "ab"))) == {"ab"}  # a sibling, not nested
    assert _names(index.nesting(guards.output_base("s3://b", "ns", "new"))) == set()


def test_the_guard_decides_the_same_on_the_index_as_on_a_full_list() -> None:
    jobs = [
        _job("a", "s3://b/out", "2026-01-01T00:00:00Z"),
        _job("x", "s3://b/out/ns/a", "2026-01-02T00:00:00Z"),
        _job("b", "s3://b/out", "2026-01-03T00:00:00Z"),
    ]
    index = LiveJobs()
    for job in jobs:
        index.observe(job)
    for job in jobs:
        uri, meta = job["spec"]["output"]["uri"], job["metadata"]
        candidates = index.nesting(guards.output_base(uri, "ns", meta["name"]))
        assert guards.overlapping_job(meta, uri, candidates) == guards.overlapping_job(meta, uri, jobs)
    assert (
        guards.overlapping_job(
            jobs[1]["metadata"], "s3://b/out/ns/a", index.nesting(guards.output_base("s3://b/out/ns/a", "ns", "x"))
        )
        == "ns/a"
    )


def test_finished_deleted_and_moved_jobs_leave_the_index() -> None:
    index = LiveJobs()
    index.observe(_job("a", "s3://b/out", "t1"))
    index.observe(_job("a", "s3://b/elsewhere", "t1"))  # same uid, new prefix: the old one is gone
    assert _names(index.nesting(guards.output_base("s3://b/out", "ns", "a"))) == set()
    assert _names(index.nesting(guards.output_base("s3://b/elsewhere", "ns", "a"))) == {"a"}
    index.observe(_job("a", "s3://b/elsewhere", "t1", done=True))
    assert len(index) == 0
    index.observe(_job("c", "s3://b/out", "t2"))
    index.forget("uid-c")
    assert len(index) == 0 and index.nesting(guards.output_base("s3://b/out", "ns", "c")) == []
