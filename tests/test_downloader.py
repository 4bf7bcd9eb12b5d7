"""UrlGuard and Downloader.

Refusals are proven without any traffic: a transport that records every request it is
asked to send (and answers none) plus a fake resolver. Everything else runs against the
real HTTP server in tests/fakes on 127.0.0.1, reachable only with allow_private=True.
"""

from __future__ import annotations

import asyncio
import ipaddress
import os
import resource
import socket
import time
import zlib

import httpx
import pytest

from atelier.downloader import (
    Downloader,
    UrlGuard,
    build_http_client,
    forbidden_reason,
    literal_address,
)
from atelier.errors import BadImage, DownloadFailed, UrlRefused
from tests.fakes.http_server import FakeHttpServer, Route

PUBLIC_IP = "93.184.216.34"
PUBLIC_IP6 = "2606:2800:220:1:248:1893:25c8:1946"


class FakeResolver:
    """Answers from a table; a name missing from it does not resolve. Records each lookup."""

    def __init__(self, table: dict[str, list[str] | list[list[str]]] | None = None) -> None:
        self.table = table or {}
        self.lookups: list[str] = []

    async def __call__(self, host: str) -> list[str]:
        self.lookups.append(host)
        answer = self.table.get(host)
        if answer is None:
            raise socket.gaierror(socket.EAI_NONAME, "Name or service not known")
        if answer and isinstance(answer[0], list):  # successive answers: a rebinding DNS server
            return answer[min(self.lookups.count(host), len(answer)) - 1]
        return answer


class NoLookups:
    async def __call__(self, host: str) -> list[str]:
        pytest.fail(f"literal addresses must not be resolved, got {host!r}")


class RecordingTransport(httpx.AsyncBaseTransport):
    """Never touches the network: records requests and answers from `respond` (or refuses)."""

    def __init__(self, respond=None) -> None:
        self.requests: list[httpx.Request] = []
        self.respond = respond

    async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
        self.requests.append(request)
        if self.respond is None:
            raise AssertionError(f"no request may be sent, got {request.url}")
        return self.respond(request)


def offline_downloader(transport: RecordingTransport, resolver, *, allow_private: bool = False,
                       max_redirects: int = 5) -> Downloader:
    client = httpx.AsyncClient(transport=transport, follow_redirects=False)
    return Downloader(client, UrlGuard(allow_private=allow_private, resolver=resolver),
                      max_bytes=1_000_000, max_redirects=max_redirects, total_timeout_s=5.0)


@pytest.fixture
def server():
    with FakeHttpServer() as running:
        yield running


@pytest.fixture
async def client():
    shared = build_http_client(connect_timeout_s=2.0, read_timeout_s=2.0)
    yield shared
    await shared.aclose()


def loopback_downloader(client: httpx.AsyncClient, *, resolver=None, allow_private: bool = True,
                        max_bytes: int = 1_000_000, max_redirects: int = 5,
                        total_timeout_s: float = 5.0) -> Downloader:
    return Downloader(client, UrlGuard(allow_private=allow_private, resolver=resolver),
                      max_bytes=max_bytes, max_redirects=max_redirects, total_timeout_s=total_timeout_s)


# ---- UrlGuard: what is refused, with no lookup and no connection


@pytest.mark.parametrize("url", [
    "file:///etc/passwd", "ftp://example.com/a.jpg", "data:image/png;base64,iVBORw0KGgo=",
    "gopher://example.com/", "javascript:alert(1)", "ws://example.com/", "//example.com/a.jpg",
    "/relative/a.jpg", "",
])
async def test_guard_refuses_other_schemes(url: str) -> None:
    with pytest.raises(UrlRefused) as caught:
        await UrlGuard(allow_private=True, resolver=NoLookups()).check(url)
    assert caught.value.retryable is False


@pytest.mark.parametrize("url", ["http://user:secret@example.com/a.jpg", "https://user@example.com/a.jpg"])
async def test_guard_refuses_credentials_in_the_url(url: str) -> None:
    with pytest.raises(UrlRefused, match="user name or password") as caught:
        await UrlGuard(allow_private=True, resolver=NoLookups()).check(url)
    assert "secret" not in caught.value.message


@pytest.mark.parametrize("url", ["http:///a.jpg", "https://"])
async def test_guard_refuses_a_url_without_host(url: str) -> None:
    with pytest.raises(UrlRefused):
        await UrlGuard(allow_private=True, resolver=NoLookups()).check(url)


@pytest.mark.parametrize("host", [
    "127.0.0.1", "10.0.0.5", "172.16.4.4", "192.168.1.1", "169.254.169.254", "100.64.0.1",
    "0.0.0.0", "224.0.0.1", "255.255.255.255", "240.0.0.1", "198.18.0.1",
    "[::1]", "[::]", "[fe80::1]", "[fd00::1]", "[fc00::1]", "[ff02::1]",
    "[::ffff:127.0.0.1]", "[::ffff:10.0.0.1]", "[::ffff:a9fe:a9fe]",
    "[64:ff9b::a00:1]", "[2002:7f00:1::]", "[2002:a9fe:a9fe::1]",
    # Other spellings of 127.0.0.1 and 169.254.169.254 that resolvers accept.
    "2130706433", "0x7f.1", "0177.0.0.1", "127.1", "0x7f000001", "017700000001", "0xa9.0xfe.0xa9.0xfe",
    "127.0.0.1.",
])
async def test_guard_refuses_literal_non_public_addresses_without_resolving(host: str) -> None:
    with pytest.raises(UrlRefused) as caught:
        await UrlGuard(allow_private=False, resolver=NoLookups()).check(f"http://{host}/a.jpg")
    assert caught.value.retryable is False
    # httpx itself rejects some spellings (dotted with a leading zero) as invalid URLs.
    assert "refused to fetch from a" in caught.value.message or "not a valid URL" in caught.value.message


@pytest.mark.parametrize(("spelling", "address"), [
    ("2130706433", "127.0.0.1"), ("0x7f.1", "127.0.0.1"), ("0177.0.0.1", "127.0.0.1"),
    ("127.1", "127.0.0.1"), ("0xa9fea9fe", "169.254.169.254"), ("[::ffff:127.0.0.1]", "::ffff:7f00:1"),
    ("example.com", None), ("1.2.3.4.example", None),
])
def test_numeric_hosts_are_read_as_a_resolver_would(spelling: str, address: str | None) -> None:
    expected = ipaddress.ip_address(address) if address else None
    assert literal_address(spelling) == expected


def test_malformed_numeric_host_is_refused() -> None:
    with pytest.raises(UrlRefused, match="malformed"):
        literal_address("0x")


@pytest.mark.parametrize("address", [
    "10.0.0.5", "169.254.169.254", "192.168.1.1", "172.31.255.255", "127.0.0.53", "100.100.100.200",
    "::ffff:10.0.0.1", "::ffff:169.254.169.254", "fd12:3456::1", "fe80::1", "::1", "0.0.0.0",
    "64:ff9b::a9fe:a9fe", "2002:c0a8:101::1",
])
async def test_guard_refuses_a_name_that_resolves_to_a_non_public_address(address: str) -> None:
    resolver = FakeResolver({"images.example": [address]})
    with pytest.raises(UrlRefused) as caught:
        await UrlGuard(allow_private=False, resolver=resolver).check("https://images.example/a.jpg")
    assert "images.example" in caught.value.message
    assert resolver.lookups == ["images.example"]


async def test_guard_refuses_a_name_with_any_non_public_address() -> None:
    resolver = FakeResolver({"mixed.example": [PUBLIC_IP, PUBLIC_IP6, "10.0.0.5"]})
    with pytest.raises(UrlRefused, match="10.0.0.5"):
        await UrlGuard(allow_private=False, resolver=resolver).check("http://mixed.example/")


async def test_guard_accepts_public_addresses() -> None:
    resolver = FakeResolver({"cdn.example": [PUBLIC_IP, PUBLIC_IP6, "64:ff9b::5db8:d822"]})
    guard = UrlGuard(allow_private=False, resolver=resolver)
    assert await guard.addresses("https://cdn.example/a.jpg") == [PUBLIC_IP, PUBLIC_IP6, "64:ff9b::5db8:d822"]
    assert await guard.addresses("http://8.8.8.8/a.jpg") == ["8.8.8.8"]
    assert await guard.addresses(f"http://[{PUBLIC_IP6}]:443/a.jpg") == [PUBLIC_IP6]
    assert await guard.addresses("https://8.8.8.8:80/a.jpg") == ["8.8.8.8"]
    assert forbidden_reason(ipaddress.ip_address("::ffff:8.8.8.8")) is None


# ---- ports (issue 10 #10): 80 and 443, others only when configured


@pytest.mark.parametrize("url", [
    f"http://{PUBLIC_IP}:8080/a.jpg", f"https://[{PUBLIC_IP6}]:8443/a.jpg", "http://cdn.example:22/a.jpg",
    "http://cdn.example:6379/", "https://cdn.example:25/a.jpg", "http://cdn.example:0/a.jpg",
])
async def test_guard_refuses_other_ports_on_public_hosts_without_resolving(url: str) -> None:
    with pytest.raises(UrlRefused, match="port .* is not allowed") as caught:
        await UrlGuard(allow_private=False, resolver=NoLookups()).check(url)
    assert caught.value.retryable is False


async def test_configured_ports_are_allowed_and_only_they() -> None:
    resolver = FakeResolver({"cdn.example": [PUBLIC_IP]})
    guard = UrlGuard(allow_private=False, resolver=resolver, allowed_ports={8080, 8443})
    assert await guard.addresses("http://cdn.example:8080/a.jpg") == [PUBLIC_IP]
    assert await guard.addresses("https://cdn.example:8443/a.jpg") == [PUBLIC_IP]
    assert await guard.addresses("https://cdn.example/a.jpg") == [PUBLIC_IP]
    with pytest.raises(UrlRefused, match="port 9000"):
        await guard.check("http://cdn.example:9000/a.jpg")


async def test_allow_private_lifts_the_port_rule_for_loopback_tests() -> None:
    guard = UrlGuard(allow_private=True, resolver=NoLookups())
    assert await guard.addresses("http://127.0.0.1:41234/a.jpg") == ["127.0.0.1"]


async def test_a_redirect_to_another_port_is_refused_before_it_is_followed() -> None:
    transport = RecordingTransport(lambda request: httpx.Response(
        302, headers={"Location": f"http://{PUBLIC_IP}:2375/containers/json"}))
    downloader = offline_downloader(transport, NoLookups())
    with pytest.raises(UrlRefused, match="port 2375"):
        await downloader.fetch(f"http://{PUBLIC_IP}/a.jpg")
    assert len(transport.requests) == 1


async def test_webhooks_to_other_ports_are_refused_without_a_connection() -> None:
    transport = RecordingTransport()
    with pytest.raises(UrlRefused, match="port 8080"):
        await offline_downloader(transport, NoLookups()).post(f"http://{PUBLIC_IP}:8080/hook", content=b"{}",
                                                              headers={})
    assert transport.requests == []


@pytest.mark.parametrize(("url", "allowed", "refused"), [
    (f"https://{PUBLIC_IP}:8443/a.jpg", frozenset(), True),
    (f"https://{PUBLIC_IP}:8443/a.jpg", frozenset({8443}), False),
    ("https://cdn.example/a.jpg", frozenset(), False),
    ("http://cdn.example:80/a.jpg", frozenset(), False),
    ("http://cdn.example:3000/hook", frozenset(), True),
])
def test_the_api_refuses_other_ports_at_once(url: str, allowed: frozenset[int], refused: bool) -> None:
    from atelier.errors import InvalidRequest
    from starter.api.urls import check_url

    if refused:
        with pytest.raises(InvalidRequest, match="port .* is not allowed"):
            check_url(url, "webhook_url", allow_private=False, allowed_ports=allowed)
    else:
        check_url(url, "webhook_url", allow_private=False, allowed_ports=allowed)
    check_url(url, "webhook_url", allow_private=True)  # loopback tests and local runs


async def test_allow_private_admits_private_addresses_but_not_other_refusals() -> None:
    guard = UrlGuard(allow_private=True, resolver=FakeResolver({"nas.lan": ["192.168.1.10"]}))
    assert await guard.addresses("http://127.0.0.1:8000/a.jpg") == ["127.0.0.1"]
    assert await guard.addresses("http://nas.lan/a.jpg") == ["192.168.1.10"]
    with pytest.raises(UrlRefused):
        await guard.check("file:///etc/passwd")
    with pytest.raises(UrlRefused):
        await guard.check("http://admin:admin@127.0.0.1/")


@pytest.mark.parametrize("table", [{}, {"gone.example": []}, {"gone.example": ["not-an-ip"]}])
async def test_a_host_that_does_not_resolve_is_a_non_retryable_download_failure(table) -> None:
    guard = UrlGuard(allow_private=False, resolver=FakeResolver(table))
    with pytest.raises(DownloadFailed, match="gone.example") as caught:
        await guard.check("http://gone.example/a.jpg")
    assert caught.value.retryable is False


# ---- Downloader: refusals never send a request


@pytest.mark.parametrize("address", ["10.0.0.5", "169.254.169.254", "192.168.1.1", "::ffff:10.0.0.1",
                                     "100.64.0.7", "fd00::5", "fe80::1"])
async def test_fetch_never_connects_to_a_host_with_a_private_address(address: str) -> None:
    transport = RecordingTransport()
    downloader = offline_downloader(transport, FakeResolver({"evil.example": [address]}))
    with pytest.raises(UrlRefused):
        await downloader.fetch("http://evil.example/a.jpg")
    assert transport.requests == []


@pytest.mark.parametrize("location", [
    "http://internal.example/secret", "http://169.254.169.254/latest/meta-data/",
    "http://[::ffff:127.0.0.1]/", "http://2130706433/", "file:///etc/passwd",
    "http://user:pw@public.example/a.jpg",
])
async def test_redirect_to_a_forbidden_url_is_refused_before_following(location: str) -> None:
    transport = RecordingTransport(lambda request: httpx.Response(302, headers={"Location": location}))
    resolver = FakeResolver({"public.example": [PUBLIC_IP], "internal.example": ["10.0.0.5"]})
    with pytest.raises(UrlRefused):
        await offline_downloader(transport, resolver).fetch("http://public.example/a.jpg")
    assert len(transport.requests) == 1
    assert transport.requests[0].url.host == PUBLIC_IP


async def test_request_goes_to_the_address_that_was_checked() -> None:
    # A rebinding DNS server: public for the check, private for any later lookup.
    resolver = FakeResolver({"rebind.example": [[PUBLIC_IP], ["10.0.0.5"]]})
    transport = RecordingTransport(lambda request: httpx.Response(200, content=b"image bytes"))
    body = await offline_downloader(transport, resolver).fetch("https://rebind.example/a.jpg?sig=1")
    assert body == b"image bytes"
    assert resolver.lookups == ["rebind.example"]
    [sent] = transport.requests
    assert (sent.url.scheme, sent.url.host, sent.url.port, sent.url.raw_path) == (
        "https", PUBLIC_IP, None, b"/a.jpg?sig=1")
    assert sent.headers["Host"] == "rebind.example"
    assert sent.extensions["sni_hostname"] == "rebind.example"  # TLS is checked against the name


# ---- Downloader against a real server on loopback


async def test_loopback_is_refused_unless_private_is_allowed(server: FakeHttpServer,
                                                             client: httpx.AsyncClient) -> None:
    server.route("/a.jpg", body=b"secret")
    with pytest.raises(UrlRefused, match="loopback|port"):  # the fake's port is refused as well
        await loopback_downloader(client, allow_private=False).fetch(server.url("/a.jpg"))
    assert server.hits() == 0


async def test_fetches_the_body_and_reports_progress(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    body = os.urandom(300_000)
    server.route("/photo.jpg", body=body, chunk_size=50_000, headers={"Content-Type": "text/html"})
    seen: list[int] = []
    fetched = await loopback_downloader(client).fetch(server.url("/photo.jpg"), on_progress=seen.append)
    assert fetched == body
    assert seen and seen[-1] == len(body)
    assert seen == sorted(seen)
    [request] = server.requests
    assert request.method == "GET"
    assert request.headers["Accept-Encoding"] == "identity"


async def test_async_progress_callbacks_are_awaited(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.route("/a.jpg", body=b"x" * 1000)
    seen: list[int] = []

    async def progress(done: int) -> None:
        await asyncio.sleep(0)
        seen.append(done)

    await loopback_downloader(client).fetch(server.url("/a.jpg"), on_progress=progress)
    assert seen[-1] == 1000


async def test_host_header_and_connection_use_the_resolved_name(server: FakeHttpServer,
                                                                client: httpx.AsyncClient) -> None:
    server.route("/a.jpg", body=b"named")
    resolver = FakeResolver({"images.test": ["127.0.0.1"]})
    body = await loopback_downloader(client, resolver=resolver).fetch(server.url("/a.jpg", host="images.test"))
    assert body == b"named"
    assert server.requests[0].headers["Host"] == f"images.test:{server.port}"


async def test_an_unreachable_address_falls_back_to_the_next(server: FakeHttpServer,
                                                             client: httpx.AsyncClient) -> None:
    server.route("/a.jpg", body=b"second address")
    # The server listens on 127.0.0.1 only: 127.0.0.2 refuses the connection.
    resolver = FakeResolver({"multi.test": ["127.0.0.2", "127.0.0.1"]})
    body = await loopback_downloader(client, resolver=resolver).fetch(server.url("/a.jpg", host="multi.test"))
    assert body == b"second address"


async def test_declared_length_over_the_cap_is_refused_before_reading(server: FakeHttpServer,
                                                                      client: httpx.AsyncClient) -> None:
    # Reading this body would take 100 s: the refusal must come from the header alone.
    server.trickle("/huge.jpg", b"x" * 100, interval_s=1.0, content_length=5_000_000)
    started = time.perf_counter()
    with pytest.raises(BadImage, match="larger than 1000000 bytes") as caught:
        await loopback_downloader(client, max_bytes=1_000_000).fetch(server.url("/huge.jpg"))
    assert time.perf_counter() - started < 1.0
    assert caught.value.retryable is False


async def test_an_endless_body_is_cut_just_past_the_cap(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.endless("/endless.jpg")
    seen: list[int] = []
    with pytest.raises(BadImage, match="larger than 200000 bytes") as caught:
        await loopback_downloader(client, max_bytes=200_000).fetch(server.url("/endless.jpg"),
                                                                    on_progress=seen.append)
    assert caught.value.retryable is False
    assert max(seen, default=0) <= 200_000


async def test_a_body_of_exactly_the_cap_is_accepted(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.route("/exact.jpg", body=b"y" * 4096, content_length=False)
    server.route("/over.jpg", body=b"y" * 4097, content_length=False)
    downloader = loopback_downloader(client, max_bytes=4096)
    assert len(await downloader.fetch(server.url("/exact.jpg"))) == 4096
    with pytest.raises(BadImage, match="larger than 4096 bytes"):
        await downloader.fetch(server.url("/over.jpg"))


async def test_a_trickling_server_is_cut_by_the_total_timeout(server: FakeHttpServer,
                                                              client: httpx.AsyncClient) -> None:
    # Each byte comes well within the read timeout; only the whole-fetch deadline can stop it.
    server.trickle("/slow.jpg", b"z" * 100, interval_s=0.2)
    started = time.perf_counter()
    with pytest.raises(DownloadFailed, match="longer than 1 s") as caught:
        await loopback_downloader(client, total_timeout_s=1.0).fetch(server.url("/slow.jpg"))
    assert 0.9 <= time.perf_counter() - started < 2.5
    assert caught.value.retryable is True


async def test_a_server_that_stops_answering_is_a_retryable_read_timeout(server: FakeHttpServer) -> None:
    server.route("/stall.jpg", delay_s=3.0, body=b"late")
    async with build_http_client(connect_timeout_s=1.0, read_timeout_s=0.3) as impatient:
        with pytest.raises(DownloadFailed, match="timed out") as caught:
            await loopback_downloader(impatient).fetch(server.url("/stall.jpg"))
    assert caught.value.retryable is True


@pytest.mark.parametrize("status", [301, 302, 303, 307, 308])
async def test_relative_redirects_are_followed(server: FakeHttpServer, client: httpx.AsyncClient,
                                               status: int) -> None:
    server.redirect("/start", "/dir/next", status=status)
    server.redirect("/dir/next", "../final.jpg?v=2", status=status)
    server.route("/final.jpg", body=b"arrived")
    assert await loopback_downloader(client).fetch(server.url("/start")) == b"arrived"
    assert [request.path for request in server.requests] == ["/start", "/dir/next", "/final.jpg?v=2"]


async def test_redirect_to_another_host_is_checked_and_followed(server: FakeHttpServer,
                                                                client: httpx.AsyncClient) -> None:
    server.redirect("/start", server.url("/final.jpg", host="cdn.test"))
    server.route("/final.jpg", body=b"from the cdn")
    resolver = FakeResolver({"cdn.test": ["127.0.0.1"]})
    assert await loopback_downloader(client, resolver=resolver).fetch(server.url("/start")) == b"from the cdn"
    assert resolver.lookups == ["cdn.test"]
    assert server.requests[-1].headers["Host"] == f"cdn.test:{server.port}"


async def test_a_redirect_loop_ends_with_too_many_redirects(server: FakeHttpServer,
                                                            client: httpx.AsyncClient) -> None:
    server.redirect("/loop", "/loop")
    with pytest.raises(DownloadFailed, match="too many redirects") as caught:
        await loopback_downloader(client, max_redirects=3).fetch(server.url("/loop"))
    assert caught.value.retryable is False
    assert server.hits("/loop") == 4


async def test_no_redirects_allowed_means_none_followed(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.redirect("/start", "/final.jpg")
    server.route("/final.jpg", body=b"never")
    with pytest.raises(DownloadFailed, match="too many redirects"):
        await loopback_downloader(client, max_redirects=0).fetch(server.url("/start"))
    assert server.hits("/final.jpg") == 0


async def test_a_redirect_without_location_fails_for_good(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.route("/broken", status=302)
    with pytest.raises(DownloadFailed, match="without a Location") as caught:
        await loopback_downloader(client).fetch(server.url("/broken"))
    assert caught.value.retryable is False


@pytest.mark.parametrize(("status", "retryable"), [
    (400, False), (401, False), (403, False), (404, False), (410, False),
    (408, True), (429, True), (500, True), (502, True), (503, True), (504, True), (304, False),
])
async def test_http_errors_carry_the_status_and_whether_to_retry(server: FakeHttpServer, client: httpx.AsyncClient,
                                                                 status: int, retryable: bool) -> None:
    server.route("/a.jpg", status=status, body=b"<html>error</html>")
    with pytest.raises(DownloadFailed, match=str(status)) as caught:
        await loopback_downloader(client).fetch(server.url("/a.jpg?token=SECRET"))
    assert caught.value.retryable is retryable
    assert "SECRET" not in caught.value.message


@pytest.mark.parametrize("route", [Route(reset=True), Route(body=b"x" * 1000, reset_after_bytes=100)],
                         ids=["before-answer", "mid-body"])
async def test_a_reset_connection_is_retryable(server: FakeHttpServer, client: httpx.AsyncClient,
                                               route: Route) -> None:
    server.route("/a.jpg", route)
    with pytest.raises(DownloadFailed) as caught:
        await loopback_downloader(client).fetch(server.url("/a.jpg"))
    assert caught.value.retryable is True


async def test_a_refused_connection_is_retryable(client: httpx.AsyncClient) -> None:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        closed_port = probe.getsockname()[1]
    with pytest.raises(DownloadFailed, match="connection") as caught:
        await loopback_downloader(client).fetch(f"http://127.0.0.1:{closed_port}/a.jpg")
    assert caught.value.retryable is True


async def test_a_body_shorter_than_declared_is_retryable(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.route("/short.jpg", body=b"x" * 100, content_length=1000)
    with pytest.raises(DownloadFailed) as caught:
        await loopback_downloader(client).fetch(server.url("/short.jpg"))
    assert caught.value.retryable is True


def test_the_shared_client_follows_no_redirects_and_ignores_the_environment() -> None:
    built = build_http_client(connect_timeout_s=3.0, read_timeout_s=7.0)
    assert built.follow_redirects is False
    assert built.trust_env is False
    assert (built.timeout.connect, built.timeout.read) == (3.0, 7.0)


async def test_the_shared_client_keeps_no_cookies(server: FakeHttpServer, client: httpx.AsyncClient) -> None:
    server.route("/a.jpg", body=b"a", headers={"Set-Cookie": "session=abc; Path=/"})
    downloader = loopback_downloader(client)
    await downloader.fetch(server.url("/a.jpg"))
    await downloader.fetch(server.url("/a.jpg"))
    assert "Cookie" not in server.requests[1].headers
    assert len(client.cookies.jar) == 0


# ---- webhook POSTs: the answer's body is never trusted (issue 10 #1)


def gzip_bomb_parts() -> tuple[bytes, bytes]:
    """(start, block): `start` then `block` repeated is a gzip stream where each block of
    about 1 KB inflates to 1 MiB of zeros. After a full flush deflate starts afresh, so
    every later block is the same bytes: 10 MB of the stream inflate to about 10 GB, and
    nothing near that size is ever held here."""
    deflate = zlib.compressobj(9, zlib.DEFLATED, 31)
    zeros = bytes(1 << 20)
    start = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    block = deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    assert block == deflate.compress(zeros) + deflate.flush(zlib.Z_FULL_FLUSH)
    return start, block


def peak_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # kB on Linux


BOMB_BYTES = 10 * 1024 * 1024


async def test_a_webhook_answering_with_a_gzip_bomb_is_not_inflated(client: httpx.AsyncClient) -> None:
    start, block = gzip_bomb_parts()
    with FakeHttpServer(max_body_bytes=BOMB_BYTES) as bomb:
        bomb.route("/hook", status=200, prefix=start, body=block, endless=True,
                   headers={"Content-Encoding": "gzip", "Content-Type": "application/json"},
                   content_length=BOMB_BYTES)
        before = peak_rss_mb()
        began = time.monotonic()
        status = await loopback_downloader(client).post(bomb.url("/hook"), content=b"{}",
                                                        headers={"content-type": "application/json"})
        elapsed = time.monotonic() - began
        grown = peak_rss_mb() - before
        [request] = bomb.requests
    assert status == 200
    assert request.headers["Accept-Encoding"] == "identity"
    assert grown < 100, f"the worker grew by {grown:.0f} MB answering one webhook"
    assert elapsed < 15  # the POST's own bound (POST_TIMEOUT_S), not a performance figure


async def test_a_webhook_answering_without_end_is_cut_after_a_few_kb(client: httpx.AsyncClient) -> None:
    with FakeHttpServer(max_body_bytes=1 << 40) as endless:
        endless.endless("/hook", chunk=os.urandom(65536), content_length=False)
        before = peak_rss_mb()
        downloader = loopback_downloader(client)
        downloader.post_timeout_s = 5.0
        status = await asyncio.wait_for(downloader.post(endless.url("/hook"), content=b"{}", headers={}), 30)
        grown = peak_rss_mb() - before
    assert status == 200
    assert grown < 100


async def test_a_webhook_answering_a_byte_at_a_time_is_cut_by_the_post_deadline(client: httpx.AsyncClient) -> None:
    # Each byte comes well within the read timeout: only the POST's own deadline stops it.
    with FakeHttpServer() as drip:
        drip.route("/hook", status=200, body=b"x", chunk_size=1, interval_s=0.2, endless=True, content_length=False)
        downloader = loopback_downloader(client)
        downloader.post_timeout_s = 1.0
        began = time.monotonic()
        with pytest.raises(DownloadFailed, match="longer than 1 s") as caught:
            await asyncio.wait_for(downloader.post(drip.url("/hook"), content=b"{}", headers={}), 30)
        assert time.monotonic() - began < 5
    assert caught.value.retryable is True


async def test_a_webhook_that_never_answers_is_cut_by_the_post_deadline() -> None:
    # The read timeout is far longer than the POST's deadline: the deadline must cut it.
    with FakeHttpServer() as silent:
        silent.route("/hook", delay_s=20.0, status=204)
        async with build_http_client(connect_timeout_s=2.0, read_timeout_s=60.0) as patient:
            downloader = loopback_downloader(patient)
            downloader.post_timeout_s = 1.0
            began = time.monotonic()
            with pytest.raises(DownloadFailed, match="longer than 1 s"):
                await asyncio.wait_for(downloader.post(silent.url("/hook"), content=b"{}", headers={}), 30)
            assert time.monotonic() - began < 5
