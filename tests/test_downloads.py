"""download_and_convert through a real workflow (issue 10 #12): the input images are fetched in
parallel within one budget that fits the activity's start-to-close timeout, with heartbeats
while they are decoded, and a retry keeps what the failed attempt already stored (heartbeat
details): it fetches only the rest. Requests are counted on a real image host on loopback."""

from __future__ import annotations

import dataclasses
import io
import random

from PIL import Image

from atelier.messages import GenerationResult, ImageInput, Status
from tests.fakes.http_server import FakeHttpServer, RecordedRequest, Route
from tests.test_generation import assert_money

IMAGES = 5


def noise_jpeg(width: int, height: int, seed: int) -> bytes:
    """A JPEG of random pixels: about as many bytes as pixels, and a real decode."""
    image = Image.frombytes("RGB", (width, height), random.Random(seed).randbytes(width * height * 3))
    out = io.BytesIO()
    image.save(out, "JPEG", quality=90)
    return out.getvalue()


async def _run(h, server: FakeHttpServer, count: int) -> GenerationResult:
    user = await h.user(100)
    async with h.worker():
        handle = await h.start(user, "fitting", [ImageInput(url=server.url(f"/in/{i}.jpg")) for i in range(count)])
        result: GenerationResult = await handle.result()
    await assert_money(h, handle.id, Status(result.status), h.settings.cost_of("fitting"))
    return result


async def test_five_large_images_from_a_slow_host_are_stored_within_the_timeout(harness):
    """Each image takes about 5 s to arrive: one after another (25 s) they never fit in the 15 s
    start-to-close; side by side they do, on the first attempt."""
    h = harness
    h.timeouts = dataclasses.replace(h.timeouts, download_start_to_close_s=15, download_heartbeat_s=3)
    with FakeHttpServer() as host:
        for i in range(IMAGES):
            body = noise_jpeg(1600, 1200, seed=i)
            host.trickle(f"/in/{i}.jpg", body, chunk_size=len(body) // 10 + 1, interval_s=0.5)
        result = await _run(h, host, IMAGES)
        hits = [host.hits(f"/in/{i}.jpg") for i in range(IMAGES)]
    assert result.status == "completed", result
    assert hits == [1] * IMAGES  # the first attempt got them all: no retry fetched any again


async def test_a_retry_after_a_failure_on_image_4_does_not_fetch_images_1_to_3_again(harness):
    h = harness
    with FakeHttpServer() as host:
        bodies = [noise_jpeg(320, 240, seed=10 + i) for i in range(IMAGES)]
        for i in range(IMAGES):
            if i != 3:
                host.route(f"/in/{i}.jpg", body=bodies[i], headers={"Content-Type": "image/jpeg"})
        answered: list[int] = []

        def flaky(request: RecordedRequest) -> Route:
            answered.append(1)
            if len(answered) == 1:
                return Route(status=503, body=b"try again")
            return Route(body=bodies[3], headers={"Content-Type": "image/jpeg"})

        host.route("/in/3.jpg", flaky)
        result = await _run(h, host, IMAGES)
        hits = [host.hits(f"/in/{i}.jpg") for i in range(IMAGES)]
    assert result.status == "completed", result
    assert hits == [1, 1, 1, 2, 1], hits


async def test_a_bad_image_fails_at_once_and_stops_the_others(harness):
    """A failure no retry can fix (not an image) ends the download without waiting for the rest."""
    h = harness
    with FakeHttpServer() as host:
        host.route("/in/0.jpg", body=b"<html>not an image</html>", headers={"Content-Type": "image/jpeg"})
        for i in range(1, 3):
            host.trickle(f"/in/{i}.jpg", noise_jpeg(320, 240, seed=i), chunk_size=1000, interval_s=1.0)
        result_or_error = None
        try:
            result_or_error = await _run(h, host, 3)
        except Exception as err:  # noqa: BLE001 - the workflow fails: its error is checked below
            result_or_error = err
        hits = [host.hits(f"/in/{i}.jpg") for i in range(3)]
    cause = getattr(getattr(result_or_error, "cause", None), "type", None)
    assert cause == "BadImage", repr(result_or_error)
    assert hits == [1, 1, 1]  # no retry


async def test_the_heartbeat_goes_on_while_an_image_is_decoded(harness, monkeypatch):
    """A decode longer than the heartbeat timeout (here made slow on purpose) is not mistaken
    for a dead worker: the first attempt completes."""
    import time as clock

    from atelier import images

    real = images.prepare_image

    def slow_prepare(*args, **kwargs):
        clock.sleep(3.0)  # in the decoding thread, as a very large image would take
        return real(*args, **kwargs)

    monkeypatch.setattr(images, "prepare_image", slow_prepare)
    h = harness
    h.timeouts = dataclasses.replace(h.timeouts, download_start_to_close_s=30, download_heartbeat_s=1)
    with FakeHttpServer() as host:
        for i in range(2):
            host.route(f"/in/{i}.jpg", body=noise_jpeg(320, 240, seed=20 + i), headers={"Content-Type": "image/jpeg"})
        result = await _run(h, host, 2)
        hits = [host.hits(f"/in/{i}.jpg") for i in range(2)]
    assert result.status == "completed", result
    assert hits == [1, 1]
