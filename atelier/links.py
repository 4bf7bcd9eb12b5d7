"""Signed, time-limited image links: an `<img>` tag, a phone app or a webhook receiver can load
a generated image without an API key, for a while.

A link is `{base}/v1/images/{key}?owner=..&expires=..&sig=..`. The signature is an HMAC-SHA256
(ATELIER_URL_SIGNING_SECRET) of the blob key, its owner and the expiry. The owner is in it so a
link stops working when its owner deletes the image, even if another user holds the same bytes
(the blob store is content-addressed). A thumbnail width (`w`) is not signed: any holder of a
link may ask for one of the few widths offered.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import re
import time
from dataclasses import dataclass

# Widths a thumbnail may be asked for: a bounded set, so thumbnails cannot fill the store.
THUMBNAIL_WIDTHS = (256, 512, 1024)

_SIG = re.compile(r"[A-Za-z0-9_-]{43}")  # base64url of 32 bytes, unpadded
_OWNER = re.compile(r"[A-Za-z0-9_.:@-]{1,64}")
_EXPIRES = re.compile(r"[0-9]{1,12}")  # not str.isdigit: it takes "²", which int() refuses


class LinkRefused(Exception):
    """A link that must not load: `code` says why (for the 403 answer)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code
        self.message = message


def _digest(secret: bytes, key: str, owner: str, expires: int) -> str:
    mac = hmac.new(secret, f"v1\x00{key}\x00{owner}\x00{expires}".encode(), hashlib.sha256).digest()
    return base64.urlsafe_b64encode(mac).rstrip(b"=").decode()


@dataclass(frozen=True)
class LinkSigner:
    """Makes and checks signed image links. `ttl_s` is how long a new link stays valid at least.

    The expiry is rounded up to a step of a twelfth of the lifetime (5 minutes of an hour): the
    links made within one step are the same URL, so a client polling a generation, a browser's
    cache or a CDN sees one link per image, not a new one per read (an `<img>` whose URL changed
    loads the image again). A link lives between `ttl_s` and `ttl_s` plus one step."""

    secret: bytes
    ttl_s: int

    @property
    def step_s(self) -> int:
        return max(1, self.ttl_s // 12)

    def sign(self, base_url: str, key: str, owner: str, *, now: float | None = None) -> str:
        earliest = int(now if now is not None else time.time()) + self.ttl_s
        expires = -(-earliest // self.step_s) * self.step_s
        sig = _digest(self.secret, key, owner, expires)
        return f"{base_url.rstrip('/')}/v1/images/{key}?owner={owner}&expires={expires}&sig={sig}"

    def verify(self, key: str, owner: str, expires: str, sig: str, *, now: float | None = None) -> None:
        """Return if the link is genuine and unexpired; raise LinkRefused otherwise."""
        if not (_SIG.fullmatch(sig) and _OWNER.fullmatch(owner) and _EXPIRES.fullmatch(expires)):
            raise LinkRefused("BadSignature", "this image link is malformed or was altered: ask the API for a fresh one")
        expected = _digest(self.secret, key, owner, int(expires))
        # Constant time: a caller learns nothing from how long a wrong signature took to refuse.
        if not hmac.compare_digest(expected.encode(), sig.encode()):
            raise LinkRefused("BadSignature",
                              "this image link's signature does not match: it was altered or not made by this server")
        if int(expires) <= int(now if now is not None else time.time()):
            raise LinkRefused("LinkExpired",
                              "this image link has expired: GET the generation or work again for a fresh link")


def signer_from(settings) -> LinkSigner | None:
    """The signer of these settings, or None when no signing secret is set (links then need a key)."""
    secret = settings.url_signing_secret
    if secret is None or not secret.get_secret_value():
        return None
    return LinkSigner(secret.get_secret_value().encode(), int(settings.url_ttl_s))
