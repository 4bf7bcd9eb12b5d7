"""Fetch a user's image URL without letting the URL reach anything it should not.

`UrlGuard` decides which URLs may be fetched and which addresses they may reach;
`Downloader` fetches one URL with a shared `httpx.AsyncClient`, following redirects
itself so that every hop is checked, streaming the body under a size cap and the whole
fetch under one deadline. Nothing here knows about Temporal: failures are
`atelier.errors` exceptions whose `retryable` flag the activity passes on.

Each request is sent to the exact address the guard approved (the URL's host is
replaced by that address; the Host header and TLS server name keep the real name), so
a DNS answer that changes between the check and the connect cannot reach a private
address.
"""

from __future__ import annotations

import asyncio
import inspect
import ipaddress
import re
import socket
from collections.abc import Awaitable, Callable
from http.cookiejar import CookieJar, DefaultCookiePolicy

import httpx

from atelier.errors import BadImage, DownloadFailed, UrlRefused

Resolver = Callable[[str], Awaitable[list[str]]]
ProgressCallback = Callable[[int], object]
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address

ALLOWED_SCHEMES = frozenset({"http", "https"})
# Ports a URL may name without configuration (ATELIER_ALLOWED_URL_PORTS adds others).
DEFAULT_URL_PORTS = frozenset({80, 443})
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
# Client errors a later attempt may well not get (timeouts, rate limits).
RETRYABLE_CLIENT_STATUSES = frozenset({408, 425, 429})
USER_AGENT = "atelier-downloader/0.1"
# A host with many addresses: try a few when connecting fails, not all of them.
MAX_ADDRESSES_TRIED = 4
# A webhook's answer is its status: of the body, read this much at most (and never decode it).
MAX_POST_RESPONSE_BYTES = 4096
# A webhook POST in all (connect, send, answer): well inside the notify activity's 30 s.
POST_TIMEOUT_S = 15.0

_CGNAT = ipaddress.ip_network("100.64.0.0/10")
_NAT64 = ipaddress.ip_network("64:ff9b::/96")
# What inet_aton accepts: 1 to 4 parts, each decimal, octal (leading 0) or hex (0x).
_NUMERIC_HOST = re.compile(r"(0x[0-9a-f]*|[0-9]+)(\.(0x[0-9a-f]*|[0-9]+)){0,3}\.?", re.IGNORECASE | re.ASCII)

# Not str.isdigit, which takes "²" (and int() then refuses it).
_DECIMAL = re.compile(r"[0-9]{1,20}")


async def system_resolver(host: str) -> list[str]:
    """The addresses the operating system's resolver gives for `host`, in its order."""
    infos = await asyncio.get_running_loop().getaddrinfo(host, None, type=socket.SOCK_STREAM)
    return [str(info[4][0]) for info in infos]


def literal_address(host: str) -> IPAddress | None:
    """The address a literal-IP host names, in any form a resolver would accept
    (dotted, decimal `2130706433`, hex `0x7f.1`, octal `0177.0.0.1`, short `127.1`);
    None for a host name."""
    bare = host.strip("[]")
    try:
        return ipaddress.ip_address(bare.split("%", 1)[0])
    except ValueError:
        pass
    if _NUMERIC_HOST.fullmatch(bare):
        try:
            return ipaddress.IPv4Address(socket.inet_aton(bare.rstrip(".")))
        except OSError:
            raise UrlRefused(f"malformed numeric host {host!r}") from None
    return None


def forbidden_reason(address: IPAddress) -> str | None:
    """Why a non-public address may not be fetched from, or None for a public one."""
    if isinstance(address, ipaddress.IPv6Address):
        # Addresses that carry an IPv4 address are judged by it: that is where they lead.
        mapped = address.ipv4_mapped
        if mapped is not None:
            reason = forbidden_reason(mapped)
            return f"{reason} (IPv4-mapped {address})" if reason else None
        if address in _NAT64:
            embedded = ipaddress.IPv4Address(int(address) & 0xFFFFFFFF)
            reason = forbidden_reason(embedded)
            return f"{reason} (NAT64 {address})" if reason else None
        sixtofour = address.sixtofour
        if sixtofour is not None:
            reason = forbidden_reason(sixtofour)
            if reason:
                return f"{reason} (6to4 {address})"
    if address.is_loopback:
        return f"loopback address {address}"
    if address.is_unspecified:
        return f"unspecified address {address}"
    if address.is_link_local:
        return f"link-local address {address}"
    if address.is_multicast:
        return f"multicast address {address}"
    if isinstance(address, ipaddress.IPv4Address) and address in _CGNAT:
        return f"shared (CGNAT) address {address}"
    if address.is_private:
        return f"private address {address}"
    if address.is_reserved:
        return f"reserved address {address}"
    if not address.is_global:
        return f"non-public address {address}"
    return None


def display_url(url: httpx.URL) -> str:
    """The URL as errors may show it: no query or fragment, which may carry signed tokens."""
    port = f":{url.port}" if url.port else ""
    text = f"{url.scheme}://{url.host}{port}{url.path}"
    return text if len(text) <= 200 else text[:197] + "..."


def _parse(url: str | httpx.URL) -> httpx.URL:
    if isinstance(url, httpx.URL):
        return url
    try:
        return httpx.URL(url)
    except (httpx.InvalidURL, TypeError, ValueError) as exc:
        raise UrlRefused(f"not a valid URL: {exc}") from None


def port_refusal(url: httpx.URL, allowed_ports: frozenset[int] | set[int]) -> str | None:
    """Why the port `url` names may not be used (None if it may): 80, 443 and `allowed_ports`."""
    port = url.port if url.port is not None else (443 if url.scheme == "https" else 80)
    if port in DEFAULT_URL_PORTS or port in allowed_ports:
        return None
    return f"port {port} is not allowed (80 and 443 are; others only when listed in ATELIER_ALLOWED_URL_PORTS)"


class UrlGuard:
    """Which URLs may be fetched: http(s) only, no credentials in the URL, and, unless
    `allow_private` (tests and local runs), only hosts all of whose addresses are public and
    only ports 80, 443 and `allowed_ports`."""

    def __init__(self, *, allow_private: bool, resolver: Resolver | None = None,
                 allowed_ports: frozenset[int] | set[int] = frozenset()) -> None:
        self.allow_private = allow_private
        self.allowed_ports = frozenset(allowed_ports)
        self._resolve = resolver or system_resolver

    async def check(self, url: str) -> None:
        """Raise UrlRefused (or DownloadFailed if the host does not resolve) unless `url` may be fetched."""
        await self.addresses(url)

    async def addresses(self, url: str | httpx.URL) -> list[str]:
        """Check `url` and return the addresses it may be fetched from, in resolver order."""
        parsed = _parse(url)
        if parsed.scheme not in ALLOWED_SCHEMES:
            raise UrlRefused(f"only http and https URLs are fetched, not {parsed.scheme or 'a relative URL'!r}")
        host = parsed.raw_host.decode("ascii")
        if not host:
            raise UrlRefused("the URL has no host")
        if parsed.userinfo:
            raise UrlRefused("URLs with a user name or password are refused")
        if not self.allow_private:
            refusal = port_refusal(parsed, self.allowed_ports)
            if refusal:
                raise UrlRefused(f"{refusal}: {display_url(parsed)}")

        literal = literal_address(host)
        if literal is not None:
            self._refuse_if_forbidden(host, literal)
            return [str(literal)]

        try:
            answers = await self._resolve(host)
        except (OSError, UnicodeError, ValueError) as exc:
            raise DownloadFailed(f"could not resolve host {host!r}: {exc}", retryable=False) from None
        addresses: list[IPAddress] = []
        for answer in answers:
            try:
                address = ipaddress.ip_address(str(answer).split("%", 1)[0])
            except ValueError:
                raise DownloadFailed(f"host {host!r} resolved to a malformed address {answer!r}",
                                     retryable=False) from None
            if address not in addresses:
                addresses.append(address)
        if not addresses:
            raise DownloadFailed(f"could not resolve host {host!r}: no addresses", retryable=False)
        # One forbidden address is enough: the connection could go to any of them.
        for address in addresses:
            self._refuse_if_forbidden(host, address)
        return [str(a) for a in addresses]

    def _refuse_if_forbidden(self, host: str, address: IPAddress) -> None:
        if self.allow_private:
            return
        reason = forbidden_reason(address)
        if reason:
            shown = host if host == str(address) else f"{host} -> {address}"
            raise UrlRefused(f"refused to fetch from a {reason} ({shown})")


def build_http_client(connect_timeout_s: float, read_timeout_s: float, *,
                      max_connections: int = 100) -> httpx.AsyncClient:
    """The one client the worker shares between downloads. Redirects are followed by
    `Downloader` (each hop checked), proxies from the environment are ignored and no
    cookie is ever kept (one user's download must not carry another's cookies)."""
    return httpx.AsyncClient(
        follow_redirects=False,
        trust_env=False,
        timeout=httpx.Timeout(connect=connect_timeout_s, read=read_timeout_s,
                              write=read_timeout_s, pool=connect_timeout_s),
        limits=httpx.Limits(max_connections=max_connections, max_keepalive_connections=0),
        cookies=CookieJar(policy=DefaultCookiePolicy(allowed_domains=[])),
        headers={"User-Agent": USER_AGENT},
    )


class Downloader:
    def __init__(self, client: httpx.AsyncClient, guard: UrlGuard, *, max_bytes: int,
                 max_redirects: int, total_timeout_s: float, post_timeout_s: float = POST_TIMEOUT_S) -> None:
        self.client = client
        self.guard = guard
        self.max_bytes = max_bytes
        self.max_redirects = max_redirects
        self.total_timeout_s = total_timeout_s
        self.post_timeout_s = post_timeout_s

    async def fetch(self, url: str, on_progress: ProgressCallback | None = None) -> bytes:
        """The body at `url`. `on_progress(bytes_so_far)` (sync or async) is called as it arrives."""
        try:
            async with asyncio.timeout(self.total_timeout_s):
                return await self._fetch(_parse(url), on_progress)
        except TimeoutError:
            raise DownloadFailed(f"download took longer than {self.total_timeout_s:g} s",
                                 retryable=True) from None

    async def _fetch(self, url: httpx.URL, on_progress: ProgressCallback | None) -> bytes:
        for _hop in range(self.max_redirects + 1):
            addresses = await self.guard.addresses(url)
            response = await self._send(url, addresses)
            try:
                status = response.status_code
                if status in REDIRECT_STATUSES:
                    location = response.headers.get("location")
                    if not location:
                        raise DownloadFailed(f"HTTP {status} redirect without a Location from {display_url(url)}",
                                             retryable=False)
                    try:
                        url = url.join(location)
                    except (httpx.InvalidURL, ValueError) as exc:
                        raise UrlRefused(f"redirect to an invalid URL: {exc}") from None
                    continue
                self._raise_for_status(status, url)
                return await self._read_body(response, url, on_progress)
            except httpx.HTTPError as exc:
                raise _failure(exc, url) from None
            finally:
                await response.aclose()
        raise DownloadFailed(f"too many redirects (more than {self.max_redirects})", retryable=False)

    async def _send(self, url: httpx.URL, addresses: list[str]) -> httpx.Response:
        last_error: httpx.HTTPError | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            request = self._pinned_request(url, address)
            try:
                return await self.client.send(request, stream=True, follow_redirects=False)
            except httpx.InvalidURL:
                # httpx builds the next request from a Location header even when not following it;
                # a data:, javascript: or malformed Location fails there.
                raise UrlRefused(f"{display_url(url)} redirected to a URL that is not a valid http(s) URL") from None
            except httpx.ConnectError as exc:
                last_error = exc  # this address is unreachable: try the host's next one
            except httpx.HTTPError as exc:
                raise _failure(exc, url) from None
        assert last_error is not None
        raise _failure(last_error, url) from None

    def _pinned_request(self, url: httpx.URL, address: str, *, method: str = "GET", content: bytes | None = None,
                        headers: dict[str, str] | None = None) -> httpx.Request:
        """A request sent to `address`, the one the guard approved, with the real name kept in
        the Host header and TLS: a DNS answer that changes after the check changes nothing."""
        pinned = {
            "Host": url.netloc.decode("ascii"),
            "Accept": "image/jpeg, image/png, image/webp, image/*;q=0.8",
            # Images are compressed already; a compressed body could inflate far past the cap in one chunk.
            "Accept-Encoding": "identity",
            # Never reuse a connection: it was set up for (and its TLS checked against) one host name.
            "Connection": "close",
        }
        pinned.update(headers or {})
        extensions = {}
        if url.scheme == "https" and literal_address(url.raw_host.decode("ascii")) is None:
            extensions["sni_hostname"] = url.raw_host.decode("ascii")
        return self.client.build_request(method, url.copy_with(host=address), headers=pinned, content=content,
                                         extensions=extensions)

    async def post(self, url: str, *, content: bytes, headers: dict[str, str]) -> int:
        """POST through the same guard (webhooks): checked, pinned to the approved address,
        redirects not followed, the whole exchange within `post_timeout_s`. Returns the status
        code; of the answer's body at most MAX_POST_RESPONSE_BYTES raw bytes are read (a
        receiver answering with a gzip bomb or an endless body costs nothing). Raises
        DownloadFailed or UrlRefused."""
        target = _parse(url)
        try:
            async with asyncio.timeout(self.post_timeout_s):
                return await self._post(target, content, headers)
        except TimeoutError:
            raise DownloadFailed(f"POST to {display_url(target)} took longer than {self.post_timeout_s:g} s",
                                 retryable=True) from None

    async def _post(self, target: httpx.URL, content: bytes, headers: dict[str, str]) -> int:
        addresses = await self.guard.addresses(target)
        last_error: httpx.HTTPError | None = None
        for address in addresses[:MAX_ADDRESSES_TRIED]:
            request = self._pinned_request(target, address, method="POST", content=content,
                                           headers={"Accept": "*/*", **headers, "Accept-Encoding": "identity"})
            try:
                response = await self.client.send(request, stream=True, follow_redirects=False)
            except httpx.ConnectError as exc:
                last_error = exc
                continue
            except httpx.HTTPError as exc:
                raise _failure(exc, target) from None
            try:
                # Raw bytes: a Content-Encoding the receiver chose is never decoded.
                seen = 0
                async for chunk in response.aiter_raw():
                    seen += len(chunk)
                    if seen >= MAX_POST_RESPONSE_BYTES:
                        break
            except httpx.HTTPError:
                pass  # the status is the answer; a body cut short changes nothing
            finally:
                await response.aclose()
            return response.status_code
        assert last_error is not None
        raise _failure(last_error, target) from None

    @staticmethod
    def _raise_for_status(status: int, url: httpx.URL) -> None:
        if 200 <= status < 300:
            return
        where = display_url(url)
        if status >= 500:
            raise DownloadFailed(f"HTTP {status} from {where}", retryable=True)
        if 400 <= status < 500:
            raise DownloadFailed(f"HTTP {status} from {where}",
                                 retryable=status in RETRYABLE_CLIENT_STATUSES)
        raise DownloadFailed(f"unexpected HTTP {status} from {where}", retryable=False)

    async def _read_body(self, response: httpx.Response, url: httpx.URL,
                         on_progress: ProgressCallback | None) -> bytes:
        declared = response.headers.get("content-length")
        if declared is not None and _DECIMAL.fullmatch(declared.strip()) and int(declared) > self.max_bytes:
            raise BadImage(f"image is larger than {self.max_bytes} bytes "
                           f"(Content-Length {int(declared)} from {display_url(url)})", retryable=False)
        body = bytearray()
        async for chunk in response.aiter_bytes():
            body += chunk[: self.max_bytes + 1 - len(body)]
            if len(body) > self.max_bytes:
                raise BadImage(f"image is larger than {self.max_bytes} bytes ({display_url(url)})",
                               retryable=False)
            if on_progress is not None:
                result = on_progress(len(body))
                if inspect.isawaitable(result):
                    await result
        return bytes(body)


def _failure(exc: httpx.HTTPError, url: httpx.URL) -> DownloadFailed | UrlRefused:
    where = display_url(url)
    if isinstance(exc, httpx.UnsupportedProtocol):
        return UrlRefused(f"unsupported URL {where}")
    if isinstance(exc, httpx.TimeoutException):
        return DownloadFailed(f"timed out fetching {where} ({type(exc).__name__})", retryable=True)
    if isinstance(exc, (httpx.NetworkError, httpx.RemoteProtocolError)):
        return DownloadFailed(f"connection to {where} failed: {type(exc).__name__}: {exc}", retryable=True)
    if isinstance(exc, httpx.DecodingError):
        return DownloadFailed(f"could not decode the body from {where}: {exc}", retryable=False)
    return DownloadFailed(f"fetching {where} failed: {type(exc).__name__}: {exc}", retryable=True)
