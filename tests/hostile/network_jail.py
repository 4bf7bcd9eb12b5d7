"""Proof that nothing is sent off this machine: a transport and a resolver that answer only
for a make-believe public host, in-process, and a jail on Python's sockets that refuses (and
records) any connection or name lookup that is not loopback.

With the jail on, a broken URL guard cannot reach a private address: the attempt is refused
here, recorded, and the test fails on the record.
"""

from __future__ import annotations

import contextlib
import ipaddress
import socket
from collections.abc import Iterator

import httpx

LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "testserver"}


class OffMachine(AssertionError):
    """Something tried to reach beyond loopback."""


class InProcessPublicHost(httpx.AsyncBaseTransport):
    """An httpx transport that never opens a socket: it answers for one make-believe public
    address from a table, and refuses (recording the URL) every other destination."""

    def __init__(self, address: str, routes: dict[str, tuple[int, dict[str, str], bytes]]) -> None:
        self.address = address
        self.routes = routes
        self.served: list[str] = []
        self.refused: list[str] = []

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        if request.url.host != self.address:
            self.refused.append(str(request.url))
            raise httpx.ConnectError(f"test transport: asked to connect to {request.url.host}")
        self.served.append(f"{request.headers.get('host')}{request.url.raw_path.decode()}")
        status, headers, body = self.routes.get(request.url.path, (404, {}, b"not found"))
        return httpx.Response(status, headers=headers, content=body, request=request)


def table_resolver(table: dict[str, list[str]]):
    """An injected resolver: names in `table` resolve to its addresses, others do not exist."""

    async def resolve(host: str) -> list[str]:
        try:
            return list(table[host.lower().rstrip(".")])
        except KeyError:
            raise socket.gaierror(socket.EAI_NONAME, f"{host} is not in the test's table") from None

    return resolve


def _is_loopback(host) -> bool:
    if host is None:
        return True
    if isinstance(host, bytes):
        host = host.decode("ascii", "replace")
    host = str(host)
    if host in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.split("%", 1)[0]).is_loopback
    except ValueError:
        return False


@contextlib.contextmanager
def loopback_only() -> Iterator[list[str]]:
    """Within: Python sockets may connect and resolve only loopback. Yields the attempts refused."""
    attempts: list[str] = []
    real_connect, real_connect_ex = socket.socket.connect, socket.socket.connect_ex
    real_getaddrinfo = socket.getaddrinfo

    def _check(sock, address) -> None:
        if sock.family in (socket.AF_INET, socket.AF_INET6) and not _is_loopback(address[0]):
            attempts.append(f"connect {address!r}")
            raise OffMachine(f"refused: connect to {address!r} is not loopback")

    def connect(self, address):
        _check(self, address)
        return real_connect(self, address)

    def connect_ex(self, address):
        _check(self, address)
        return real_connect_ex(self, address)

    def getaddrinfo(host, *args, **kwargs):
        if not _is_loopback(host):
            attempts.append(f"resolve {host!r}")
            raise socket.gaierror(socket.EAI_NONAME, f"refused: resolving {host!r} is not loopback")
        return real_getaddrinfo(host, *args, **kwargs)

    socket.socket.connect, socket.socket.connect_ex = connect, connect_ex
    socket.getaddrinfo = getaddrinfo
    try:
        yield attempts
    finally:
        socket.socket.connect, socket.socket.connect_ex = real_connect, real_connect_ex
        socket.getaddrinfo = real_getaddrinfo
