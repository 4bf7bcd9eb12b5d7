"""Timeouts, retry policies and fallback rules of every activity call, named, in one place.

The numbers come from the request's `Timeouts` (filled from settings by the starter), so
an operator can change them without a code change; the shapes and reasons live here.
This is workflow code: what is decided here changes the commands a workflow issues, so a
change needs `workflow.patched()` (see docs/deployment.md).
"""

from __future__ import annotations

from datetime import timedelta

from temporalio.common import RetryPolicy

from atelier.messages import ErrorCode, Timeouts

_NEVER_RETRY = [
    ErrorCode.INVALID_REQUEST.value,
    ErrorCode.INSUFFICIENT_CREDITS.value,
    ErrorCode.UNKNOWN_USER.value,
    ErrorCode.BAD_IMAGE.value,
    ErrorCode.URL_REFUSED.value,
    ErrorCode.CONTENT_BLOCKED.value,
    ErrorCode.PROVIDER_REJECTED.value,
    ErrorCode.ALREADY_REFUNDED.value,
]

# Errors the provider returned that another model of the catalogue cannot fix either: the
# generation fails instead of falling back. Workflow code (it decides which commands follow).
NO_FALLBACK_ERRORS = frozenset({ErrorCode.CONTENT_BLOCKED.value, ErrorCode.BAD_IMAGE.value})

# Charge, select, save: quick database calls; a few tries cover a database blip.
SHORT_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=200),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=5),
    maximum_attempts=8,
    non_retryable_error_types=_NEVER_RETRY,
)

# Refund: money owed back to a user; retried until it succeeds, however long that takes.
REFUND_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=1),
    maximum_attempts=0,
)

# Download: remote servers blink; bad images and refused URLs are final.
DOWNLOAD_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=20),
    maximum_attempts=4,
    non_retryable_error_types=_NEVER_RETRY,
)


def ai_retry(t: Timeouts) -> RetryPolicy:
    """AI call: 429/5xx/timeouts retried with backoff (Retry-After overrides the interval);
    after `ai_max_attempts` the workflow falls back to the next model."""
    return RetryPolicy(
        initial_interval=timedelta(seconds=2),
        backoff_coefficient=2.0,
        maximum_interval=timedelta(seconds=30),
        maximum_attempts=t.ai_max_attempts,
        non_retryable_error_types=_NEVER_RETRY,
    )


# AI call, one attempt per activity: the workflow retries, waits out 429s and records each attempt.
AI_ONE_ATTEMPT = RetryPolicy(maximum_attempts=1)


# Joining a model's line (signal-with-start of its admission workflow): retried until it works;
# the generation's deadline bounds the wait.
ADMISSION_RETRY = RetryPolicy(
    initial_interval=timedelta(milliseconds=500),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(seconds=10),
    maximum_attempts=0,
)


# Webhook: the receiver may be down for hours; the schedule-to-close timeout bounds it.
NOTIFY_RETRY = RetryPolicy(
    initial_interval=timedelta(seconds=1),
    backoff_coefficient=2.0,
    maximum_interval=timedelta(minutes=10),
    maximum_attempts=0,
    non_retryable_error_types=[ErrorCode.URL_REFUSED.value],
)


def seconds(value: float) -> timedelta:
    return timedelta(seconds=value)
