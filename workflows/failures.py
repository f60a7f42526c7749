"""How the experiment workflow retries its heavy activities and names the reason it failed.

Plain values and functions with no I/O, imported by the workflow (deterministic) and by tests.
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy
from temporalio.exceptions import ActivityError, ApplicationError, FailureError

# A heavy activity (validation, aggregation, evaluation) is tried this many times in all. Retries
# cover a worker that died (heartbeat timeout) or a database or blob store that is restarting; with
# the backoff below the last attempt starts about 8 minutes after the first failure.
HEAVY_MAX_ATTEMPTS = 20
# Failures that the same input would meet again: retrying cannot help, so the experiment fails at once.
# Matched on the exception's class name, as Temporal records it.
PERMANENT_ERRORS = [
    "AGGREGATION_FAILED",
    "ValueError",
    "TypeError",
    "KeyError",
    "IndexError",
    "AttributeError",
    "NotImplementedError",
    "ZeroDivisionError",
    "AssertionError",
    "WeightsFormatError",
    "BlobIntegrityError",
    "BlobNotFoundError",
    "InvalidBlobKeyError",
    "DatasetNotFoundError",
    "DatasetFormatError",
    "PolicyError",
]
HEAVY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    maximum_interval=timedelta(seconds=30),
    maximum_attempts=HEAVY_MAX_ATTEMPTS,
    non_retryable_error_types=PERMANENT_ERRORS,
)
# The error code of a failure that names none of its own.
INTERNAL_ERROR = "INTERNAL_ERROR"
# Workflow code raised something that is not a Temporal failure (a bug): the experiment fails with it.
WORKFLOW_ERROR = "WORKFLOW_ERROR"
REASON_MAX_CHARS = 1000


def failure_reason(exc: BaseException) -> tuple[str, str]:
    """The error code and a one-line reason for an experiment that ended with ``exc``.

    An activity's failure names the activity and its cause (``aggregate_round failed: ValueError: ...``)
    rather than Temporal's generic "Activity task failed".
    """
    if isinstance(exc, ActivityError):
        cause = exc.cause
        what = f"{exc.activity_type or 'an activity'} failed"
        if isinstance(cause, ApplicationError):
            detail = f"{cause.type}: {cause.message}" if cause.type else cause.message
            # fedloom's own codes are upper case; a Python exception's class name is not a code.
            code = cause.type if cause.type and cause.type.isupper() else INTERNAL_ERROR
            return code, _clip(f"{what}: {detail}")
        if isinstance(cause, FailureError):
            return INTERNAL_ERROR, _clip(f"{what}: {type(cause).__name__}: {cause.message}")
        return INTERNAL_ERROR, _clip(what)
    if isinstance(exc, ApplicationError):
        return exc.type or INTERNAL_ERROR, _clip(exc.message or str(exc))
    if isinstance(exc, FailureError):
        return INTERNAL_ERROR, _clip(f"{type(exc).__name__}: {exc.message}")
    return WORKFLOW_ERROR, _clip(f"{type(exc).__name__} in workflow code: {exc}")


def _clip(text: str) -> str:
    return text if len(text) <= REASON_MAX_CHARS else text[: REASON_MAX_CHARS - 3] + "..."
