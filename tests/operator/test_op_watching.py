"""The server-side label selectors of the operator's watches (runner._configure_watching) never hide an object
that one of its handlers wants: every handler of a filtered kind asks for the very label the selector names."""

from __future__ import annotations

import kopf
from kopf._cogs.structs import references

from kubetune_operator import handlers, runner
from kubetune_operator.settings import Settings


def _resource(group: str, plural: str) -> references.Resource:
    kind = plural[:-1].capitalize()
    return references.Resource(
        group=group, version="v1", plural=plural, kind=kind, singular=plural[:-1], namespaced=True
    )


CONFIGMAPS = _resource("", "configmaps")
RAYJOBS = _resource("ray.io", "rayjobs")
DEPLOYMENTS = _resource("apps", "deployments")


def _settings() -> kopf.OperatorSettings:
    s = kopf.OperatorSettings()
    runner.configure(s, Settings(webhook=False), None)
    return s


def test_only_labelled_configmaps_and_rayjobs_are_watched() -> None:
    selectors = _settings().watching.label_selectors
    assert list(selectors.collect(CONFIGMAPS)) == ["kubetune.io/inference-server"]
    assert list(selectors.collect(RAYJOBS)) == ["kubetune.io/job"]
    assert list(selectors.collect(DEPLOYMENTS)) == []  # two handlers, two different labels: no selector


def test_every_handler_of_a_filtered_kind_wants_the_selected_label() -> None:
    selectors = _settings().watching.label_selectors
    registry = kopf.OperatorRegistry()
    handlers.register(registry)
    for resource in (CONFIGMAPS, RAYJOBS):
        (label,) = selectors.collect(resource)
        found = [h for h in registry._watching.get_all_handlers() if h.selector and h.selector.check(resource)]
        assert found, resource
        for handler in found:
            assert handler.labels is not None and label in handler.labels, (resource.plural, handler.id)


def test_idle_workers_let_go_of_their_last_body_within_a_second() -> None:
    assert _settings().queueing.idle_timeout <= 1.0
