"""Opaque page cursors.

A visibility page token goes back to Temporal, so a client must not be able to forge one
(a garbage token makes the server retry and fail): the cursor carries an HMAC over the
token, the user and the filters, and anything else is refused with 400 before Temporal.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import secrets
from datetime import datetime

from atelier.settings import Settings
from starter.api.errors import ApiError

MAC_BYTES = 16
MAX_CURSOR_CHARS = 4096


def cursor_key(settings: Settings) -> bytes:
    """Derived from a secret every replica shares, so a cursor works on any of them; with
    none configured, a per-process key (cursors then live as long as the process)."""
    for secret in (settings.admin_token, settings.webhook_secret):
        if secret is not None and secret.get_secret_value():
            return hashlib.sha256(b"atelier list cursor\x00" + secret.get_secret_value().encode()).digest()
    return secrets.token_bytes(32)


def _b64encode(data: bytes) -> str:
    return base64.urlsafe_b64encode(data).decode("ascii").rstrip("=")


def _b64decode(text: str) -> bytes:
    if len(text) > MAX_CURSOR_CHARS:
        raise ApiError(400, "BadCursor", "invalid cursor")
    try:
        return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))
    except (binascii.Error, ValueError):
        raise ApiError(400, "BadCursor", "invalid cursor") from None


def _mac(key: bytes, token: bytes, scope: tuple[str, ...]) -> bytes:
    message = "\x00".join(scope).encode("utf-8") + b"\x00" + token
    return hmac.new(key, message, hashlib.sha256).digest()[:MAC_BYTES]


def seal(key: bytes, token: bytes, scope: tuple[str, ...]) -> str:
    return _b64encode(_mac(key, token, scope) + token)


def open_sealed(key: bytes, cursor: str, scope: tuple[str, ...]) -> bytes:
    raw = _b64decode(cursor)
    mac, token = raw[:MAC_BYTES], raw[MAC_BYTES:]
    if len(raw) <= MAC_BYTES or not hmac.compare_digest(mac, _mac(key, token, scope)):
        raise ApiError(400, "BadCursor", "invalid cursor (cursors only work with the filters they came from)")
    return token


def encode_time(value: datetime) -> str:
    return _b64encode(value.isoformat().encode("ascii"))


def decode_time(cursor: str) -> datetime:
    try:
        return datetime.fromisoformat(_b64decode(cursor).decode("ascii"))
    except (UnicodeDecodeError, ValueError):
        raise ApiError(400, "BadCursor", "invalid cursor") from None
