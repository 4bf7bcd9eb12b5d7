"""The hostile-input corpus: bytes that pretend to be images, servers that misbehave, URLs that
point where they must not, and requests that break every rule of the API.

Each case names what it is and what it must end in: refused at the API with one of a few
statuses, or accepted and then failed with a named error code (and a refund). A 5xx is never
an acceptable end. The test modules send each case through the real API and a real worker.
"""

from __future__ import annotations

import gzip
import struct
from dataclasses import dataclass, field
from typing import Callable

from tests.fakes import images as img

# ---- what a case must end in ------------------------------------------------------------------


@dataclass(frozen=True)
class Expect:
    """Refused at the API with one of `statuses`, or failed with one of `codes` and refunded."""

    statuses: frozenset[int] = frozenset()
    codes: frozenset[str] = frozenset()


def refused(*statuses: int) -> Expect:
    return Expect(statuses=frozenset(statuses))


def fails(*codes: str) -> Expect:
    return Expect(codes=frozenset(codes))


BAD_IMAGE = fails("BadImage")
DOWNLOAD_FAILED = fails("DownloadFailed")
URL_REFUSED = fails("UrlRefused")


# ---- bytes that are not acceptable images -------------------------------------------------------


def jpeg_declaring(width: int, height: int) -> bytes:
    """A small, valid JPEG whose frame header (SOF0) claims `width`x`height`."""
    data = bytearray(img.jpeg(64, 48))
    sof = data.find(b"\xff\xc0")
    assert sof > 0
    data[sof + 5:sof + 9] = struct.pack(">HH", height, width)
    return bytes(data)


def png_with_bad_crc() -> bytes:
    data = bytearray(img.png(64, 48))
    data[29] ^= 0xFF  # inside IHDR's CRC
    return bytes(data)


# name -> (bytes, the file name it is served or uploaded under)
BAD_BYTES: dict[str, tuple[Callable[[], bytes], str]] = {
    "plain-text": (lambda: b"hello, this is not an image\n" * 20, "photo.jpg"),
    "html-as-jpg": (lambda: img.HTML, "photo.jpg"),
    "svg-as-png": (lambda: img.SVG, "photo.png"),
    "svg-with-script": (lambda: b'<svg xmlns="http://www.w3.org/2000/svg" onload="alert(1)"><script>alert(2)</script></svg>',
                        "photo.png"),
    "zero-bytes": (lambda: b"", "photo.jpg"),
    "truncated-jpeg": (lambda: img.truncated(img.jpeg(640, 480), 0.4), "photo.jpg"),
    "truncated-png": (lambda: img.truncated(img.png(640, 480), 0.5), "photo.png"),
    "jpeg-magic-then-garbage": (lambda: b"\xff\xd8\xff\xe0" + b"\x00garbage" * 64, "photo.jpg"),
    "png-bad-crc": (png_with_bad_crc, "photo.png"),
    "png-zero-width": (lambda: img.png_declaring(0, 100), "photo.png"),
    "decompression-bomb-png": (lambda: img.bomb_png(100_000), "photo.png"),
    "png-30000x30000": (lambda: img.png_declaring(30_000, 30_000), "photo.png"),
    "jpeg-30000x30000": (lambda: jpeg_declaring(30_000, 30_000), "photo.jpg"),
    "gif": (lambda: img.gif(), "photo.gif"),
    "pdf": (lambda: b"%PDF-1.4\n1 0 obj<</Type/Catalog>>endobj\ntrailer<<>>\n%%EOF\n", "photo.jpg"),
    "json": (lambda: b'{"image": "not really"}', "photo.jpg"),
}


# ---- misbehaving image hosts (served on loopback) -----------------------------------------------


@dataclass(frozen=True)
class HostCase:
    """A URL on the loopback image host; `route` is FakeHttpServer.route keyword fields."""

    id: str
    path: str
    route: dict = field(default_factory=dict)
    expect: Expect = DOWNLOAD_FAILED
    # Registers something other than a plain route (redirects to other paths, endless bodies).
    setup: Callable | None = None


def _host_cases() -> list[HostCase]:
    cases = [HostCase(f"url-{name}", f"/bytes/{name}/{filename}",
                      {"body": make(), "headers": {"Content-Type": "image/jpeg"}}, BAD_IMAGE)
             for name, (make, filename) in BAD_BYTES.items()]
    gz = gzip.compress(b"\0" * (64 * 1024 * 1024), compresslevel=9)  # 64 MB of zeros in ~64 KB
    cases += [
        HostCase("url-http-404", "/missing.jpg", {"status": 404, "body": b"not found"}),
        HostCase("url-http-500-always", "/broken.jpg", {"status": 500, "body": b"oops"}),
        HostCase("url-http-403-html", "/login.jpg", {"status": 403, "body": img.HTML,
                                                     "headers": {"Content-Type": "text/html"}}),
        HostCase("url-connection-reset", "/reset.jpg", {"reset": True}),
        HostCase("url-reset-mid-body", "/half.jpg", {"body": img.jpeg(800, 600), "reset_after_bytes": 2000}),
        HostCase("url-content-length-lie", "/short.jpg", {"body": img.jpeg(64, 48)[:100], "content_length": 50_000}),
        HostCase("url-one-byte-per-second", "/trickle.jpg",
                 {"body": img.jpeg(64, 48), "chunk_size": 1, "interval_s": 1.0}),
        HostCase("url-no-answer", "/silent.jpg", {"delay_s": 60.0}),
        HostCase("url-200mb-stream", "/endless.jpg",
                 {"body": b"\xff\xd8\xff\xe0" + b"\0" * 65532, "endless": True,
                  "headers": {"Content-Type": "image/jpeg"}}, BAD_IMAGE),
        HostCase("url-200mb-declared", "/declared.jpg",
                 {"body": b"\xff\xd8\xff", "content_length": 200 * 1024 * 1024}, BAD_IMAGE),
        HostCase("url-gzip-bomb", "/gzip.jpg",
                 {"body": gz, "headers": {"Content-Type": "image/jpeg", "Content-Encoding": "gzip"}},
                 fails("BadImage", "DownloadFailed")),
        HostCase("url-redirect-loop", "/loop.jpg", {"status": 302, "headers": {"Location": "/loop.jpg"}}),
        HostCase("url-redirect-chain-too-long", "/hop0.jpg", setup=_redirect_chain),
        HostCase("url-redirect-without-location", "/nowhere.jpg", {"status": 301}),
        HostCase("url-redirect-to-file", "/to-file.jpg",
                 {"status": 302, "headers": {"Location": "file:///etc/passwd"}}, URL_REFUSED),
        HostCase("url-redirect-to-ftp", "/to-ftp.jpg",
                 {"status": 302, "headers": {"Location": "ftp://127.0.0.1/a.jpg"}}, URL_REFUSED),
        HostCase("url-redirect-to-data", "/to-data.jpg",
                 {"status": 302, "headers": {"Location": "data:image/png;base64,iVBORw0KGgo="}}, URL_REFUSED),
        HostCase("url-redirect-to-javascript", "/to-js.jpg",
                 {"status": 302, "headers": {"Location": "javascript:alert(1)"}}, URL_REFUSED),
        HostCase("url-redirect-malformed", "/to-garbage.jpg",
                 {"status": 302, "headers": {"Location": "http://[::1"}}, fails("UrlRefused", "DownloadFailed")),
    ]
    return cases


def _redirect_chain(server) -> None:
    # Ten hops, each to the next: more than max_redirects (5), never a loop.
    for hop in range(10):
        server.redirect(f"/hop{hop}.jpg", f"/hop{hop + 1}.jpg")
    server.route("/hop10.jpg", body=img.jpeg(64, 48))


HOST_CASES = _host_cases()

# ---- uploads -------------------------------------------------------------------------------------


@dataclass(frozen=True)
class UploadCase:
    id: str
    data: Callable[[], bytes]
    filename: str = "photo.jpg"
    expect: Expect = refused(422)


UPLOAD_CASES = [UploadCase(f"upload-{name}", make, filename) for name, (make, filename) in BAD_BYTES.items()] + [
    # Larger than ATELIER_MAX_DOWNLOAD_BYTES (20 MB by default): refused while it streams in.
    UploadCase("upload-21mb", lambda: b"\xff\xd8\xff" + b"\0" * (21 * 1024 * 1024), expect=refused(413)),
]

# ---- URLs the guard must refuse, before connecting ----------------------------------------------


@dataclass(frozen=True)
class GuardCase:
    id: str
    url: str
    expect: Expect


# Refused by the API itself (no DNS needed), or by the worker's guard before any connection.
GUARD_CASES = [
    GuardCase("file-url", "file:///etc/passwd", refused(422)),
    GuardCase("ftp-url", "ftp://public.example/a.jpg", refused(422)),
    GuardCase("data-url", "data:image/png;base64,iVBORw0KGgoAAAANSUhEUg==", refused(422)),
    GuardCase("gopher-url", "gopher://public.example:70/_GET%20/", refused(422)),
    GuardCase("javascript-url", "javascript:alert(1)", refused(422)),
    GuardCase("relative-url", "/etc/passwd", refused(422)),
    GuardCase("url-with-credentials", "http://admin:secret@public.example/a.jpg", refused(422)),
    GuardCase("loopback-v4", "http://127.0.0.1:8000/v1/admin/users", refused(422)),
    GuardCase("loopback-other", "http://127.8.9.10/a.jpg", refused(422)),
    GuardCase("localhost-name", "http://localhost:7233/", refused(422)),
    GuardCase("loopback-decimal", "http://2130706433/a.jpg", refused(422)),
    GuardCase("loopback-hex", "http://0x7f.0.0.1/a.jpg", refused(422)),
    GuardCase("loopback-octal", "http://0177.0.0.1/a.jpg", refused(422)),
    GuardCase("loopback-short", "http://127.1/a.jpg", refused(422)),
    GuardCase("unspecified", "http://0.0.0.0/a.jpg", refused(422)),
    GuardCase("private-10", "http://10.0.0.5/a.jpg", refused(422)),
    GuardCase("private-172", "http://172.16.3.4/a.jpg", refused(422)),
    GuardCase("private-192", "http://192.168.1.1/a.jpg", refused(422)),
    GuardCase("cgnat", "http://100.64.1.2/a.jpg", refused(422)),
    GuardCase("link-local-metadata", "http://169.254.169.254/latest/meta-data/", refused(422)),
    GuardCase("loopback-v6", "http://[::1]/a.jpg", refused(422)),
    GuardCase("link-local-v6", "http://[fe80::1]/a.jpg", refused(422)),
    GuardCase("unique-local-v6", "http://[fd00::1]/a.jpg", refused(422)),
    GuardCase("v6-mapped-loopback", "http://[::ffff:127.0.0.1]/a.jpg", refused(422)),
    GuardCase("v6-mapped-private", "http://[::ffff:10.0.0.1]/a.jpg", refused(422)),
    GuardCase("v6-mapped-metadata", "http://[::ffff:a9fe:a9fe]/a.jpg", refused(422)),
    GuardCase("nat64-private", "http://[64:ff9b::a00:1]/a.jpg", refused(422)),
    GuardCase("multicast", "http://224.0.0.1/a.jpg", refused(422)),
    # Names: the API does no DNS; the worker's guard resolves (an injected resolver here) and refuses.
    GuardCase("name-resolving-private", "http://intranet.example/a.jpg", URL_REFUSED),
    GuardCase("name-resolving-loopback", "http://loop.example/a.jpg", URL_REFUSED),
    GuardCase("name-resolving-metadata", "http://metadata.example/latest/meta-data/", URL_REFUSED),
    GuardCase("name-resolving-v6-mapped", "http://mapped.example/a.jpg", URL_REFUSED),
    GuardCase("name-resolving-public-and-private", "http://mixed.example/a.jpg", URL_REFUSED),
    GuardCase("name-not-resolving", "http://nxdomain.example/a.jpg", DOWNLOAD_FAILED),
    # A public host (answered in-process, never on a network) redirecting inward.
    GuardCase("redirect-to-private", "http://public.example/to-private.jpg", URL_REFUSED),
    GuardCase("redirect-to-metadata", "http://public.example/to-metadata.jpg", URL_REFUSED),
    GuardCase("redirect-to-loopback-name", "http://public.example/to-localhost.jpg", URL_REFUSED),
    GuardCase("redirect-to-private-name", "http://public.example/to-intranet.jpg", URL_REFUSED),
    GuardCase("redirect-to-v6-mapped", "http://public.example/to-mapped.jpg", URL_REFUSED),
    GuardCase("redirect-to-file", "http://public.example/to-file.jpg", URL_REFUSED),
]

# What the injected resolver answers; any other name fails as if it did not exist.
PUBLIC_ADDRESS = "93.184.215.14"  # never contacted: the test's transport answers for it in-process
RESOLVER = {
    "public.example": [PUBLIC_ADDRESS],
    "localhost": ["127.0.0.1", "::1"],
    "intranet.example": ["10.20.30.40"],
    "loop.example": ["127.0.0.1"],
    "metadata.example": ["169.254.169.254"],
    "mapped.example": ["::ffff:192.168.0.10"],
    "mixed.example": [PUBLIC_ADDRESS, "10.0.0.1"],
}
# What the in-process public host answers: path -> (status, headers, body).
PUBLIC_ROUTES = {
    "/ok.jpg": (200, {"Content-Type": "image/jpeg"}, img.jpeg(120, 90)),
    "/to-private.jpg": (302, {"Location": "http://10.0.0.7/secret.jpg"}, b""),
    "/to-metadata.jpg": (302, {"Location": "http://169.254.169.254/latest/meta-data/iam"}, b""),
    "/to-localhost.jpg": (302, {"Location": "http://localhost:7233/"}, b""),
    "/to-intranet.jpg": (302, {"Location": "http://intranet.example/a.jpg"}, b""),
    "/to-mapped.jpg": (307, {"Location": "http://[::ffff:10.0.0.1]/a.jpg"}, b""),
    "/to-file.jpg": (302, {"Location": "file:///etc/passwd"}, b""),
}
