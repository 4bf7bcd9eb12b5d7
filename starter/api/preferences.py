"""Request headers that shape how a generation is answered or bounded: `Prefer: wait=N`
(RFC 7240) and `Cancel-After` (a per-request deadline). Parsed strictly (fullmatch), bounded."""

from __future__ import annotations

import re

from starter.api.errors import ApiError

MAX_WAIT_S = 60
MAX_HEADER_CHARS = 200
_WAIT = re.compile(r'wait\s*=\s*"?(\d{1,6})"?', re.IGNORECASE)
_SECONDS = re.compile(r"(\d{1,7}(?:\.\d{1,3})?)")
_DURATION = re.compile(r"(?:(\d{1,4})h)?(?:(\d{1,6})m(?!s))?(?:(\d{1,7}(?:\.\d{1,3})?)s)?(?:(\d{1,9})ms)?")


def wait_seconds(prefer: str | None) -> int | None:
    """The N of `Prefer: wait=N`, at most MAX_WAIT_S; None when the client did not ask to wait.
    Other preferences (e.g. `respond-async`) and parameters after `;` are ignored, as RFC 7240 allows."""
    if not prefer or len(prefer) > MAX_HEADER_CHARS:
        return None
    for preference in prefer.split(","):
        match = _WAIT.fullmatch(preference.split(";", 1)[0].strip())
        if match:
            return min(int(match.group(1)), MAX_WAIT_S)
    return None


def duration_seconds(text: str, what: str = "Cancel-After") -> float:
    """`90s`, `5m`, `1h30m`, `1m30s`, `500ms` or bare seconds (`90`, `12.5`) as seconds; 422 otherwise."""
    value = text.strip()
    seconds: float | None = None
    if 0 < len(value) <= 32:
        if _SECONDS.fullmatch(value):
            seconds = float(value)
        else:
            match = _DURATION.fullmatch(value)
            if match and any(match.groups()):
                h, m, s, ms = match.groups()
                seconds = int(h or 0) * 3600 + int(m or 0) * 60 + float(s or 0) + int(ms or 0) / 1000
    if seconds is None:
        raise ApiError(422, "InvalidRequest", f"{what} must be a duration like 90s, 5m, 1h30m or a number of "
                                              f"seconds; got {value[:40]!r}")
    if seconds < 1:
        raise ApiError(422, "InvalidRequest", f"{what} must be at least 1 second")
    return seconds
