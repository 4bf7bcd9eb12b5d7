"""Checks of a URL the API can make without I/O (no DNS: the API answers at once). The
worker's UrlGuard still checks every address a URL resolves to before fetching it."""

from __future__ import annotations

import httpx

from atelier.downloader import forbidden_reason, literal_address, port_refusal
from atelier.errors import InvalidRequest, UrlRefused


def check_url(url: str, label: str, *, allow_private: bool, allowed_ports: frozenset[int] | set[int] = frozenset()) -> None:
    """Raise InvalidRequest for a URL the worker would refuse for sure. Never echoes the URL:
    its query string may carry a signed token."""
    try:
        parsed = httpx.URL(url)
        host = parsed.raw_host.decode("ascii")
    except (httpx.InvalidURL, TypeError, ValueError, UnicodeDecodeError):
        raise InvalidRequest(f"{label} is not a valid URL") from None
    if parsed.scheme not in ("http", "https"):
        raise InvalidRequest(f"{label} must be an http or https URL")
    if not host:
        raise InvalidRequest(f"{label} has no host")
    if parsed.userinfo:
        raise InvalidRequest(f"{label} may not carry a user name or password")
    if allow_private:
        return
    refusal = port_refusal(parsed, allowed_ports)
    if refusal:
        raise InvalidRequest(f"{label}: {refusal}")
    bare = host.strip("[]").rstrip(".").lower()
    if bare == "localhost" or bare.endswith(".localhost"):
        raise InvalidRequest(f"{label} points at this machine")
    try:
        address = literal_address(host)
    except UrlRefused as err:
        raise InvalidRequest(f"{label}: {err.message}") from None
    if address is not None:
        reason = forbidden_reason(address)
        if reason:
            raise InvalidRequest(f"{label} points at a {reason}")
