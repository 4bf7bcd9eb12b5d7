#!/usr/bin/env python
"""The image's HEALTHCHECK. What it checks depends on the role the entry point recorded:

- api: GET /healthz on the API's own port answers 200;
- worker: Temporal's frontend accepts a connection (a worker that cannot reach it does no work;
  a worker process that died ends the container, so that needs no check);
- migrate, or anything else: healthy (one-shot jobs are judged by their exit code).

Exit 0 healthy, 1 unhealthy, with one line saying why. Settings come from load_settings(),
so the check reads the same variables as the process it checks.
"""

from __future__ import annotations

import os
import socket
import sys
import urllib.request
from pathlib import Path

ROLE_FILE = Path(os.environ.get("TMPDIR", "/tmp")) / "atelier-role"
TIMEOUT_S = 3.0


def _loopback_if_wildcard(host: str) -> str:
    return "127.0.0.1" if host in ("", "0.0.0.0", "::", "[::]") else host


def check(role: str) -> str | None:
    """None when healthy, else the reason."""
    if role not in ("api", "worker"):
        return None
    from atelier.settings import load_settings

    settings = load_settings()
    if role == "api":
        url = f"http://{_loopback_if_wildcard(settings.api_host)}:{settings.api_port}/healthz"
        try:
            with urllib.request.urlopen(url, timeout=TIMEOUT_S) as answer:  # noqa: S310 - our own loopback URL
                return None if answer.status == 200 else f"{url} answered {answer.status}"
        except OSError as exc:
            return f"{url}: {exc}"
    host, _, port = settings.temporal_address.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), timeout=TIMEOUT_S):
            return None
    except (OSError, ValueError) as exc:
        return f"Temporal at {settings.temporal_address}: {exc}"


def main() -> int:
    role = ROLE_FILE.read_text().strip() if ROLE_FILE.exists() else ""
    reason = check(role)
    if reason:
        print(f"unhealthy ({role}): {reason}")
        return 1
    print(f"healthy ({role or 'no role'})")
    return 0


if __name__ == "__main__":
    sys.exit(main())
