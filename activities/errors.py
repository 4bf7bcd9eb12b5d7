"""Translate the world's errors into Temporal's: the error code becomes the failure type,
so retry policies and the workflow can name it."""

from __future__ import annotations

from datetime import timedelta

from temporalio.exceptions import ApplicationError

from atelier.errors import AtelierError, ProviderBusy


def to_application_error(err: AtelierError) -> ApplicationError:
    if isinstance(err, ProviderBusy):
        # The workflow decides how long to wait: the provider's delay travels in the details
        # (seconds, or None when it gave none).
        return ApplicationError(err.message, err.retry_after_s, type=err.code, non_retryable=True)
    delay = timedelta(seconds=err.retry_after_s) if err.retryable and err.retry_after_s else None
    return ApplicationError(err.message, type=err.code, non_retryable=not err.retryable, next_retry_delay=delay)
