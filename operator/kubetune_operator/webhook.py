"""The validating admission webhook: `kubectl apply` of an invalid FineTuneJob is refused up front.

Kubernetes 1.20 has no CEL rules, so the CRD's schema checks types, ranges, enums and patterns only; this
webhook adds what needs code, with the same functions the operator uses (so they cannot disagree):
- the whole spec through `kubetune.api.parse_spec` (cross-field rules: LoRA settings with method full, a
  classification task without numLabels, a tuning space over unknown fields, ...);
- the name (children's names and labels are derived from it);
- on UPDATE, the spec-change policy of `kubetune_operator.policy`: once training has started
  (`status.specHash` is set), a change to a training field is refused, naming each field.
- the images a spec names, against the registries the chart allows (`allowedImageRegistries`).
The message always starts with the field's path. Without the webhook the operator still enforces all of it,
through conditions and Events, after the fact.

Why the handler is a coroutine: kopf runs synchronous handlers in its thread pool, the same one the reconcile
handlers block in; under a burst of jobs an admission review would queue behind them and the API server's
10 s webhook timeout would refuse the request. A coroutine runs on kopf's event loop at once; it only parses
the spec (no API calls, a millisecond or two), so it never holds the loop up.
"""

from __future__ import annotations

import re
from typing import Any

import kopf

from kubetune import api
from kubetune_operator import guards, policy
from kubetune_operator.handlers import FTJ
from kubetune_operator.settings import Settings


def admission_errors(
    operation: str, new: dict[str, Any] | None, old: dict[str, Any] | None, settings: Settings | None = None
) -> list[tuple[str, str]]:
    """(path, message) for each reason to refuse; empty to admit."""
    if operation not in ("CREATE", "UPDATE") or new is None:
        return []
    errors: list[tuple[str, str]] = []
    name = (new.get("metadata") or {}).get("name") or ""
    if name and (not re.match(api.DNS_LABEL_PATTERN, name) or len(name) > 63):
        errors.append(("metadata.name", "must be a DNS label (lowercase letters, digits, '-'; at most 63)"))
    raw = new.get("spec") or {}
    spec: api.FineTuneJobSpec | None = None
    try:
        spec = api.parse_spec(raw)
    except api.SpecError as e:
        errors.extend(e.errors)
    if spec is not None and settings is not None:
        errors.extend(guards.image_errors(spec, settings))
    if operation == "UPDATE" and old is not None and (old.get("status") or {}).get("specHash"):
        old_raw = old.get("spec") or {}
        if policy.spec_hash(old_raw) != policy.spec_hash(raw):
            try:
                before: api.FineTuneJobSpec | dict[str, Any] = api.parse_spec(old_raw)
            except api.SpecError:
                before = old_raw
            changed = policy.training_changes(before, spec if spec is not None else raw)
            if changed:
                ray = ((old.get("status") or {}).get("rayJob") or {}).get("name") or "of this job"
                errors.append((changed[0], policy.rejection_message(changed, ray)))
    return errors


async def validate_job(operation: str, body: kopf.Body, old: kopf.Body | None, memo: kopf.Memo, **_: Any) -> None:
    settings = getattr(memo, "settings", None)
    errors = admission_errors(operation, dict(body), dict(old) if old is not None else None, settings)
    if errors:
        message = "; ".join(m if m.startswith(p) else f"{p}: {m}" for p, m in errors)
        raise kopf.AdmissionError(message, code=422)


def register(registry: kopf.OperatorRegistry) -> None:
    # kopf passes `operation` and `old` to admission handlers (its WebhookCause has both), but its WebhookFn
    # protocol does not declare them, so a handler that takes them does not match the protocol.
    validate = kopf.on.validate(**FTJ, id="validate", operations=["CREATE", "UPDATE"], registry=registry)
    validate(validate_job)  # type: ignore[arg-type]  # kopf's WebhookFn omits the operation/old kwargs it passes
