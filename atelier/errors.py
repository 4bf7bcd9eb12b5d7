"""Errors of the code that talks to the world. They know nothing of Temporal:
activities translate them into ApplicationError with `code` as the error type and
`retryable` deciding non_retryable."""

from __future__ import annotations

from atelier.messages import ErrorCode


class AtelierError(Exception):
    code: str = ErrorCode.INTERNAL.value
    retryable: bool = False

    def __init__(self, message: str, *, code: str | None = None, retryable: bool | None = None,
                 retry_after_s: float | None = None) -> None:
        super().__init__(message)
        self.message = message
        if code is not None:
            self.code = code
        if retryable is not None:
            self.retryable = retryable
        self.retry_after_s = retry_after_s


class InvalidRequest(AtelierError):
    code = ErrorCode.INVALID_REQUEST.value


class InsufficientCredits(AtelierError):
    code = ErrorCode.INSUFFICIENT_CREDITS.value


class UnknownUser(AtelierError):
    code = ErrorCode.UNKNOWN_USER.value


class BadImage(AtelierError):
    """The bytes are not an image we accept (not an image, truncated, a bomb, too big)."""
    code = ErrorCode.BAD_IMAGE.value


class UrlRefused(AtelierError):
    """The URL may not be fetched (scheme, private address, redirect to one...). Checked before connecting."""
    code = ErrorCode.URL_REFUSED.value


class DownloadFailed(AtelierError):
    """The fetch failed: retryable for timeouts, resets and 5xx; not for 4xx or size caps."""
    code = ErrorCode.DOWNLOAD_FAILED.value


class ContentBlocked(AtelierError):
    code = ErrorCode.CONTENT_BLOCKED.value


class ProviderRejected(AtelierError):
    """The provider refused the request for good (400/403/404, no image in the answer)."""
    code = ErrorCode.PROVIDER_REJECTED.value


class ProviderUnavailable(AtelierError):
    """The provider failed in a way a retry may fix (429, 5xx, timeout, reset, garbage)."""
    code = ErrorCode.PROVIDER_UNAVAILABLE.value
    retryable = True


class AlreadyRefunded(AtelierError):
    """The task was refunded (or its refund ran first and left a tombstone): it can no longer be
    charged, nor its work saved. Retrying cannot change that."""
    code = ErrorCode.ALREADY_REFUNDED.value


class ProviderBusy(AtelierError):
    """The provider answered 429 / RESOURCE_EXHAUSTED: over its quota, not broken. Not retried
    by the activity: the workflow waits (`retry_after_s` when the provider said) and asks again,
    without spending an attempt or falling back to another model."""
    code = ErrorCode.PROVIDER_BUSY.value
