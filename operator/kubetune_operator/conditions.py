"""The FineTuneJob's conditions: their types, their reasons, and how one is set.

Why conditions and not a phase: several facts hold at once (a job can be Validated, Suspended and have a
SpecChangeRejected), each with its own reason, message and transition time; `status.state` is only a one-word
summary derived from them for `kubectl get ftj`.

Types (PascalCase) and their reasons (CamelCase):

| type               | True when                                  | reasons                                               |
|--------------------|--------------------------------------------|-------------------------------------------------------|
| Validated          | the spec passed every check                | Valid / Invalid                                       |
| Training           | the Ray job is submitted or running        | JobPending, Running, Finishing, Retrying              |
| Succeeded          | the Ray job succeeded                      | JobSucceeded                                          |
| Failed             | the run failed for good                    | KubeRay's: AppFailed, SubmissionFailed,               |
|                    |                                            | DeadlineExceeded, JobDeploymentStatusTransition-      |
|                    |                                            | GracePeriodExceeded; ours: Invalid, Stopped,          |
|                    |                                            | RayJobDeleted, RayJobFailed (KubeRay gave no reason), |
|                    |                                            | ChildRejected (the API refused an object we built),   |
|                    |                                            | S3AccessDenied (the trainer's S3 keys were refused:   |
|                    |                                            | endpoint and bucket named, never a key)               |
| Suspended          | the RayJob is suspending or suspended      | Suspending, Suspended                                 |
| SpecChangeRejected | a training field changed after the start   | TrainingFieldsImmutable / SpecMatchesRun              |
| Blocked            | something outside the spec stops the run   | True: SecretNotFound, SecretKeyMissing (the Secret    |
|                    | from being made (retried every 15-30 s)    | and key named), NameConflict (an object by a child's  |
|                    |                                            | name is not ours; named, left untouched); False:      |
|                    |                                            | Unblocked                                             |
| Deployed           | the inference Deployment has an available  | True: Available. False, serving in progress:          |
|                    | replica serving the fine-tuned model       | Progressing, AwaitingEvaluation, ServingError         |
|                    | (set only once training succeeded and      | (API error; retried); False, needs attention:         |
|                    | serving was asked for)                     | ProgressDeadlineExceeded, ReplicaFailure,             |
|                    |                                            | ModelUnavailable, UnsupportedModel, ServingRejected,  |
|                    |                                            | NameConflict, ServerNotFound, ServerInvalid,          |
|                    |                                            | ServerRefused, ChatTemplateMismatch, SecretNotFound,  |
|                    |                                            | SecretKeyMissing (spec.deploy.server: the server's    |
|                    |                                            | tokenSecretRef); False, nothing to serve on purpose:  |
|                    |                                            | Disabled, NotImproved (the deployment gate),          |
|                    |                                            | ScaledToZero                                          |

While a condition is False its reason says where the run is (`Pending`, `Initializing`, `JobPending`,
`Running`, ...), the same vocabulary as `Training`'s, so `kubectl describe` reads naturally.
DeadlineExceeded is a reason of Failed, as in batch/v1 Jobs, rather than a condition of its own.
`Deployed` follows the Deployment's own conditions (Available, Progressing, ReplicaFailure) and
availableReplicas; see `kubetune_operator.reconcile_deploy`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from typing import Any

VALIDATED = "Validated"
TRAINING = "Training"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SUSPENDED = "Suspended"
SPEC_CHANGE_REJECTED = "SpecChangeRejected"
DEPLOYED = "Deployed"
BLOCKED = "Blocked"

# Order in which conditions are listed (stable output, readable `kubectl describe`).
ORDER = (VALIDATED, SPEC_CHANGE_REJECTED, BLOCKED, TRAINING, SUSPENDED, SUCCEEDED, FAILED, DEPLOYED)

# Reasons.
VALID = "Valid"
INVALID = "Invalid"
PENDING = "Pending"
INITIALIZING = "Initializing"
JOB_PENDING = "JobPending"
RUNNING = "Running"
FINISHING = "Finishing"
RETRYING = "Retrying"
SUSPENDING = "Suspending"
SUSPENDED_REASON = "Suspended"
JOB_SUCCEEDED = "JobSucceeded"
STOPPED = "Stopped"
RAYJOB_DELETED = "RayJobDeleted"
RAYJOB_FAILED = "RayJobFailed"
APP_FAILED = "AppFailed"
CHILD_REJECTED = "ChildRejected"
DEADLINE_EXCEEDED = "DeadlineExceeded"
TRAINING_FIELDS_IMMUTABLE = "TrainingFieldsImmutable"
SPEC_MATCHES_RUN = "SpecMatchesRun"
# Blocked
SECRET_NOT_FOUND = "SecretNotFound"
SECRET_KEY_MISSING = "SecretKeyMissing"
UNBLOCKED = "Unblocked"
# Failed, from the trainer's last line (see failure_reason)
S3_ACCESS_DENIED = "S3AccessDenied"
# Deployed
AVAILABLE = "Available"
PROGRESSING = "Progressing"
PROGRESS_DEADLINE_EXCEEDED = "ProgressDeadlineExceeded"
REPLICA_FAILURE = "ReplicaFailure"
SCALED_TO_ZERO = "ScaledToZero"
DISABLED = "Disabled"
NOT_IMPROVED = "NotImproved"
AWAITING_EVALUATION = "AwaitingEvaluation"
MODEL_UNAVAILABLE = "ModelUnavailable"
UNSUPPORTED_MODEL = "UnsupportedModel"
SERVING_ERROR = "ServingError"
SERVING_REJECTED = "ServingRejected"
NAME_CONFLICT = "NameConflict"
# Shared inference servers (spec.deploy.server): its declaration is missing or invalid, or it refuses the adapter.
SERVER_NOT_FOUND = "ServerNotFound"
SERVER_INVALID = "ServerInvalid"
SERVER_REFUSED = "ServerRefused"
# ... or it renders prompts with another chat template than the job trained with.
CHAT_TEMPLATE_MISMATCH = "ChatTemplateMismatch"
# Deployed=False for these means "nothing is meant to serve now", not "deploying": the state stays Succeeded.
NOT_SERVING_ON_PURPOSE = (DISABLED, NOT_IMPROVED, SCALED_TO_ZERO)

TRUE, FALSE, UNKNOWN = "True", "False", "Unknown"


# Markers the trainer writes into its last line ("kubetune-trainer: error: S3AccessDenied: ..."); KubeRay copies
# the end of the driver's log into the RayJob's status.message, where the operator finds them.
TRAINER_REASONS = (S3_ACCESS_DENIED,)


def failure_reason(message: str, default: str) -> str:
    """The reason of a failed run: a trainer marker found in KubeRay's message, else `default`."""
    for reason in TRAINER_REASONS:
        if f"error: {reason}:" in message:
            return reason
    return default


def get(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> Mapping[str, Any] | None:
    for c in conditions or ():
        if c.get("type") == type_:
            return c
    return None


def is_true(conditions: Iterable[Mapping[str, Any]] | None, type_: str) -> bool:
    c = get(conditions, type_)
    return c is not None and c.get("status") == TRUE


def set_condition(
    conditions: Iterable[Mapping[str, Any]] | None,
    type_: str,
    status: str,
    reason: str,
    message: str,
    *,
    now: str,
    generation: int | None,
) -> list[dict[str, Any]]:
    """A new list with `type_` set; lastTransitionTime changes only when the status does."""
    out: list[dict[str, Any]] = []
    found = False
    for c in conditions or ():
        if c.get("type") != type_:
            out.append(dict(c))
            continue
        found = True
        changed = c.get("status") != status
        out.append(
            _condition(
                type_,
                status,
                reason,
                message,
                now if changed or not c.get("lastTransitionTime") else c["lastTransitionTime"],
                generation,
            )
        )
    if not found:
        out.append(_condition(type_, status, reason, message, now, generation))
    rank = {t: i for i, t in enumerate(ORDER)}
    return sorted(out, key=lambda c: rank.get(c.get("type", ""), len(ORDER)))


def _condition(type_: str, status: str, reason: str, message: str, when: str, generation: int | None) -> dict[str, Any]:
    c: dict[str, Any] = {
        "type": type_,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": when,
    }
    if generation is not None:
        c["observedGeneration"] = generation
    return c
